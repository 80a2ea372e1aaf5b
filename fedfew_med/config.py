"""Run configuration: TOML files loaded into frozen dataclasses.

Layer 0: standard library only. Every error raised while loading a file is a
:class:`ConfigError` whose message names the file, the key, what must hold and
what was given, e.g.::

    demo.toml: [run].rounds must be an integer >= 1, got 0

Sections whose schema belongs to a higher layer (an algorithm's or a model's
options) are kept as plain mappings here and validated by that layer through
:func:`build_dataclass`, which produces the same kind of message.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names file and key."""


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_type(value: Any, hint: Any, *, where: str) -> Any:
    """Return ``value`` if it matches ``hint`` (ints are accepted as floats), else raise."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where} must be one of {choices}, got {_describe(value)}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where=where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where} has the wrong type, got {_describe(value)}")
    if origin in (tuple,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_describe(value)}")
        item = args[0] if args else Any
        return tuple(_check_type(v, item, where=f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table, got {_describe(value)}")
        return types.MappingProxyType(dict(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table, got {_describe(value)}")
        return build_dataclass(hint, value, where=where)
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a programming error


def did_you_mean(given: str, allowed: Iterable[str]) -> str:
    """`` (did you mean 'rounds'?)`` when an allowed name is close to ``given`` (difflib's ratio ≥ 0.6), else ``""``."""
    close = difflib.get_close_matches(given, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_dataclass(cls: type[T], data: Mapping[str, Any], *, where: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data``, checking keys and types.

    Parameters
    ----------
    cls
        A dataclass whose fields have simple type hints (str, int, float, bool,
        Literal, unions with None, tuple[X, ...], Mapping, nested dataclasses).
    data
        The raw table from TOML.
    where
        Prefix for error messages, e.g. ``"demo.toml: [run]"``.

    Raises
    ------
    ConfigError
        On unknown or missing keys, wrong types, or a failed ``__post_init__`` check.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], fields)}; "
            f"allowed keys are {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key_where = f"{where}.{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key_where} is required but missing")
            continue
        kwargs[name] = _check_type(data[name], hints[name], where=key_where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from None


def require(condition: bool, key: str, expectation: str, value: object) -> None:
    """Raise a ConfigError ``"<key> must <expectation>, got <value>"`` unless ``condition``.

    Used inside ``__post_init__``; :func:`build_dataclass` prefixes file and section.
    """
    if not condition:
        raise ConfigError(f"{key} must {expectation}, got {_describe(value)}")


# ---------------------------------------------------------------------------- sections

# Upper bounds: a slip such as rounds = 1000000000 or batch_size = 10**12 is refused when the
# file is read, not discovered days (or gigabytes) later.
MAX_ROUNDS = 100_000
MAX_EPOCHS = 10_000
MAX_BATCH = 100_000
MAX_LR = 10.0  # plain SGD diverges far below this
MAX_WEIGHT_DECAY = 1.0
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"
PRECISIONS = ("32", "bf16", "16-mixed")


@dataclass(frozen=True)
class RunConfig:
    """How long and how a federation runs."""

    name: str = "run"
    seed: int = 0
    rounds: int = 10
    participation: float = 1.0  # fraction of sites sampled each round
    eval_every: int = 1  # evaluate deployed models every n rounds (and always at the end)
    finetune_eval_epochs: int = 0  # >0 adds a separately labelled "+fine-tune" evaluation row
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    metric: str = ""  # the headline metric of tables and summaries; "" = the task's (accuracy, dice)

    def __post_init__(self) -> None:
        require(self.rounds >= 1, "rounds", "be an integer >= 1", self.rounds)
        require(self.rounds <= MAX_ROUNDS, "rounds", f"be at most {MAX_ROUNDS}", self.rounds)
        require(0.0 < self.participation <= 1.0, "participation", "be in (0, 1]", self.participation)
        require(self.eval_every >= 1, "eval_every", "be an integer >= 1", self.eval_every)
        require(self.eval_every <= MAX_ROUNDS, "eval_every", f"be at most {MAX_ROUNDS}", self.eval_every)
        require(self.finetune_eval_epochs >= 0, "finetune_eval_epochs", "be >= 0", self.finetune_eval_epochs)
        require(
            self.finetune_eval_epochs <= MAX_EPOCHS,
            "finetune_eval_epochs",
            f"be at most {MAX_EPOCHS}",
            self.finetune_eval_epochs,
        )
        require(self.seed >= 0, "seed", "be >= 0", self.seed)
        require(self.seed <= MAX_SEED, "seed", f"be at most {MAX_SEED} (2**32 - 1)", self.seed)
        require(self.threads >= 0, "threads", "be >= 0", self.threads)
        require(self.threads <= MAX_THREADS, "threads", f"be at most {MAX_THREADS}", self.threads)


@dataclass(frozen=True)
class TrainingConfig:
    """Local training at every site (plain SGD, as the reference code).

    ``device`` says where a site computes: ``"auto"`` (CUDA when torch sees a GPU, else the CPU),
    ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; each site resolves it on its own machine. ``precision``
    is ``"32"`` (float32, the default), ``"bf16"`` (torch.amp autocast to bfloat16) or
    ``"16-mixed"`` (autocast to float16 with a gradient scaler). Whatever the device, everything a
    site returns and every checkpoint holds CPU float32 tensors, so a run moves between devices;
    ``device`` is therefore not part of the config digest that guards resuming (``precision`` is).

    ``one_pass = true`` trains the copies a site receives in one round (FedFew's K models) together,
    in one vectorised pass (``torch.func.vmap``) over **one** data order, that of the first copy's
    slot; otherwise each copy is trained on its own with its own order. Same learning rule, so the
    results equal K separate runs given that order to float tolerance. Needs a network without
    buffers (no BatchNorm running statistics) and a site without DP.

    ``channels_last = true`` keeps the convolution weights and image batches of a 2-D (3-D)
    network in PyTorch's ``channels_last`` (``channels_last_3d``) memory format, which the CPU's
    oneDNN kernels and GPU tensor cores run faster (measured in ``benchmarks/speed.py``). The
    arithmetic is the same up to float rounding, so, like ``device``, it is not part of the digest;
    what leaves a site is contiguous as always. Networks without convolutions ignore it; DP sites
    refuse it (Opacus' per-sample gradients are written for the default layout).
    """

    local_epochs: int = 1
    lr: float = 0.005
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    device: str = "auto"
    precision: str = "32"
    one_pass: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        require(isinstance(self.device, str) and re.fullmatch(DEVICE_PATTERN, self.device) is not None, "device",
                'be "auto", "cpu", "cuda" or "cuda:N" (N a GPU index)', self.device)
        require(self.precision in PRECISIONS, "precision", f"be one of {', '.join(repr(p) for p in PRECISIONS)}", self.precision)
        require(self.local_epochs >= 1, "local_epochs", "be an integer >= 1", self.local_epochs)
        require(self.local_epochs <= MAX_EPOCHS, "local_epochs", f"be at most {MAX_EPOCHS}", self.local_epochs)
        require(self.lr > 0, "lr", "be > 0", self.lr)
        require(self.lr <= MAX_LR, "lr", f"be at most {MAX_LR:g}", self.lr)
        require(self.batch_size >= 1, "batch_size", "be an integer >= 1", self.batch_size)
        require(self.batch_size <= MAX_BATCH, "batch_size", f"be at most {MAX_BATCH}", self.batch_size)
        require(0.0 <= self.momentum < 1.0, "momentum", "be in [0, 1)", self.momentum)
        require(self.weight_decay >= 0, "weight_decay", "be >= 0", self.weight_decay)
        require(
            self.weight_decay <= MAX_WEIGHT_DECAY,
            "weight_decay",
            f"be at most {MAX_WEIGHT_DECAY:g}",
            self.weight_decay,
        )


@dataclass(frozen=True)
class FaultsConfig:
    """How the server treats sites that misbehave (section ``[faults]``; omitted = these defaults).

    A site that raises, exceeds ``site_timeout_s`` or returns an update that fails validation
    (keys, shapes, dtypes, finite values, ``max_update_norm``) is skipped for the round and
    recorded in ``metrics.jsonl`` under ``failures``; the round goes on without it.

    Attributes
    ----------
    site_timeout_s
        Seconds a site's round may take before it is skipped (``SiteTimeout``; 0, the default:
        no limit). In the simulation, a site still busy with a timed-out round is skipped until
        that work ends; its late reply is discarded. On Flower it bounds the coordinator's wait
        for each site's train or evaluate reply; 0 (or a value above the run's ``round-timeout``,
        default 600 s) leaves ``round-timeout`` as the bound, and a SuperNode that dies is given
        up once the SuperLink drops it (38–60 s, its heartbeat; docs/deployment.md).
    max_update_norm
        Largest L2 norm of an update (a returned model minus the model sent, over all its
        parameters) that is aggregated; 0 switches the check off. The default (1e4) is
        thousands of times larger than a normal SGD round's update on the bundled networks
        and stops only blown-up or scaled updates: it is a sanity bound, not a defence
        against a careful adversary.
    """

    site_timeout_s: float = 0.0
    max_update_norm: float = 1e4

    def __post_init__(self) -> None:
        require(0.0 <= self.site_timeout_s < float("inf"), "site_timeout_s", "be a finite number of seconds >= 0 (0: no limit)",
                self.site_timeout_s)
        require(0.0 <= self.max_update_norm < float("inf"), "max_update_norm", "be a finite number >= 0 (0: no bound)",
                self.max_update_norm)


@dataclass(frozen=True)
class NamedConfig:
    """A component chosen by name plus its options (validated by the layer that owns it)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))


@dataclass(frozen=True)
class FederationConfig:
    """A whole federation run, as loaded from one TOML file."""

    run: RunConfig
    algorithm: NamedConfig
    training: TrainingConfig
    model: NamedConfig
    data: NamedConfig
    source: str = "<memory>"  # the file it came from, for error messages
    # [privacy] (sample-level DP at every site) and [server_privacy] (DP of the aggregate):
    # plain tables here, validated by fedfew_med.dp; empty = off
    privacy: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    server_privacy: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able form (the resolved config written to the run directory)."""

        def plain(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            if isinstance(obj, Mapping):
                return {k: plain(v) for k, v in obj.items()}
            if isinstance(obj, tuple):
                return [plain(v) for v in obj]
            return obj

        out = plain(self)
        out.pop("source")
        for optional in _OPTIONAL_TABLES:  # absent when empty: configs without them keep their digest
            if not out[optional]:
                out.pop(optional)
        if self.faults == FaultsConfig():  # absent at its defaults: configs without [faults] keep their digest
            out.pop("faults")
        return out

    def identity(self) -> dict[str, Any]:
        """What the run's results depend on: :meth:`to_dict` without ``training.device`` and ``channels_last``.

        The device and the memory layout are how a run computes, not what it computes (a run
        started on a GPU may resume on a CPU); ``training.precision`` stays, except at its default ``"32"``, so that
        configs written before these options existed keep their digest and their cached runs
        (``one_pass`` is dropped at its default ``false`` for the same reason).
        """
        out = self.to_dict()
        training = out["training"]
        training.pop("device", None)
        training.pop("channels_last", None)
        if training.get("precision") == "32":
            training.pop("precision")
        if training.get("one_pass") is False:  # likewise: the default leaves the digest of older configs alone
            training.pop("one_pass")
        if out["run"].get("metric") == "":  # likewise for the headline metric's default
            out["run"].pop("metric")
        return out

    def digest(self) -> str:
        """SHA-256 of :meth:`identity`, used to refuse resuming a different run."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


_SECTIONS: dict[str, Any] = {
    "run": RunConfig,
    "algorithm": NamedConfig,
    "training": TrainingConfig,
    "model": NamedConfig,
    "data": NamedConfig,
    "faults": FaultsConfig,
}
_OPTIONAL_TABLES = ("privacy", "server_privacy")  # free-form tables validated by the layer that owns them


def federation_from_dict(data: Mapping[str, Any], *, source: str = "<memory>") -> FederationConfig:
    """Validate a raw mapping (as parsed from TOML) into a :class:`FederationConfig`."""
    unknown = sorted(set(data) - set(_SECTIONS) - set(_OPTIONAL_TABLES))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}]{did_you_mean(unknown[0], [*_SECTIONS, *_OPTIONAL_TABLES])}; "
            "allowed sections are "
            + ", ".join(f"[{s}]" for s in [*_SECTIONS, *_OPTIONAL_TABLES])
        )
    built: dict[str, Any] = {}
    for name in _OPTIONAL_TABLES:
        if name in data:
            built[name] = _check_type(data[name], Mapping[str, Any], where=f"{source}: [{name}]")
    for name, cls in _SECTIONS.items():
        if name not in data:
            if name in ("algorithm", "model", "data"):
                raise ConfigError(f"{source}: section [{name}] is required but missing")
            built[name] = cls()
            continue
        built[name] = build_dataclass(cls, data[name], where=f"{source}: [{name}]")
    return FederationConfig(source=source, **built)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``"section.key=value"`` (value in TOML syntax, bare words taken as strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override {text!r} must name a section and a key, e.g. run.rounds=5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with ``section.key=value`` overrides applied."""
    out = json.loads(json.dumps(data))  # deep copy of plain TOML data; never mutate the caller's
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a table")
        node[path[-1]] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax errors into one-line ConfigErrors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None


def load_federation(path: str | Path, overrides: list[str] | None = None) -> FederationConfig:
    """Load and validate a federation config file.

    Parameters
    ----------
    path
        The TOML file.
    overrides
        ``section.key=value`` strings applied on top of the file (CLI ``--set``).
    """
    raw = read_toml(path)
    base = Path(path).parent
    try:
        return federation_from_dict(_absolute_site_files(apply_overrides(raw, overrides or []), base), source=str(path))
    except ConfigError:
        culprit = _culprit(raw, overrides or [], base, str(path))
        if culprit is None:
            raise
        text, err = culprit
        where = f"{path}: "  # the error names the --set argument, not the file that holds no such value
        raise ConfigError(f"--set {text}: {str(err).removeprefix(where)}") from None


def _culprit(raw: dict[str, Any], overrides: Sequence[str], base: Path, source: str) -> tuple[str, ConfigError] | None:
    """The first ``--set`` after which the config no longer loads, with its error; None if the file alone fails."""
    for i in range(len(overrides) + 1):
        try:
            federation_from_dict(_absolute_site_files(apply_overrides(raw, list(overrides[:i])), base), source=source)
        except ConfigError as exc:
            return (overrides[i - 1], exc) if i else None
    return None


def _absolute_site_files(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Site files listed in ``[data.params].files`` become absolute, so the resolved config
    (written to the run directory) still finds them from anywhere."""
    data = raw.get("data")
    params = data.get("params") if isinstance(data, dict) else None
    files = params.get("files") if isinstance(params, dict) else None
    if isinstance(params, dict) and isinstance(files, list) and all(isinstance(f, str) for f in files):
        params["files"] = [str((base / f).resolve()) if not Path(f).is_absolute() else f for f in files]
    return raw
