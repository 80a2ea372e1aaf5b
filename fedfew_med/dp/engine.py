"""DP local training: Opacus wrapping, Poisson sampling, and a ``LocalWork`` that charges the ledger.

:func:`dp_train` trains a network in place with DP-SGD for E epochs:

- **Poisson sampling**: every step includes each record independently with probability
  ``q`` (Opacus' ``UniformWithReplacementSampler``, driven by an explicit generator),
  ``S = 1/q`` steps per epoch; gradients are averaged over the *expected* batch ``n·q``
  so the actual batch size is never revealed.
- **Per-sample clipping + noise** by Opacus, without ``PrivacyEngine`` and therefore
  without its accountant: ``GradSampleModule`` (``"hooks"``) or
  ``GradSampleModuleFastGradientClipping`` + ``DPLossFastGradientClipping`` (``"ghost"``)
  wrap a copy of the network, ``DPOptimizer`` / ``DPOptimizerFastGradientClipping``
  clip, sum and add ``N(0, (σ·C)²)`` from an explicit noise generator. The steps are
  accounted by the caller in the site's :class:`~fedfew_med.dp.ledger.PrivacyLedger`
  (one accountant for the whole run), never by a per-call accountant.
- **Physical batches**: with ``physical_batch_size > 0`` Opacus' ``BatchMemoryManager``
  splits each Poisson batch; the optimizer steps once per logical batch.
- **Empty Poisson batches** (likely on small sites: a 3-record site with ``q = 1/3``
  draws an empty batch with probability 8/27) are *stepped, not skipped*: no forward
  pass, the clipped sum is zero and the step applies pure noise ``N(0, (σ·C)²)/(n·q)``,
  exactly the sampled Gaussian mechanism the accountant assumes. Skipping the step (or
  Opacus' ``rand_on_empty``, which trains on a random fake record) would make the output
  depend on whether the batch was empty, which the analysis does not cover. Every step,
  empty or not, is counted.
- **Proximal terms** (FedProx, Ditto): ``strength · (θ − centre)`` is added to the
  gradient *after* clipping, noising and averaging. It depends only on the parameters
  and the public centre, not on any record, so it is post-processing and costs no
  privacy; putting it in the loss instead would clip it with the data gradient.
  Momentum and weight decay act on the noisy gradient, also post-processing.

:class:`DPSiteWork` is ``SiteWork`` with DP: ``train`` and ``loss`` first *spend* the
mechanisms they are about to apply in the ledger (raising
:class:`~fedfew_med.dp.ledger.PrivacyBudgetExhausted` before touching data when the
budget would be exceeded), then run DP-SGD / the loss channel. Generators derive from
the same ``(seed, round, site, slot)`` as ``SiteWork.generator(slot)`` — Poisson
sampling uses exactly that generator, the noise a sibling stream — so a resumed run
repeats an uninterrupted one bit for bit (and a replayed round releases nothing new).
Seeded noise is for reproducible research; production DP wants a cryptographic RNG.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from opacus.data_loader import wrap_collate_with_empty
from opacus.grad_sample import (
    AbstractGradSampleModule,
    GradSampleModule,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedfew_med.algorithms.base import Params, Prox, TrainResult
from fedfew_med.config import TrainingConfig
from fedfew_med.data.base import SiteData, collate
from fedfew_med.devices import to_cpu
from fedfew_med.dp.calibrate import Calibration, poisson_plan
from fedfew_med.dp.ledger import Mechanism, PrivacyLedger
from fedfew_med.dp.loss_channel import PerSampleLoss, loss_mechanism, per_sample_losses, private_losses
from fedfew_med.dp.networks import check_dp_ready
from fedfew_med.dp.options import PrivacyOptions
from fedfew_med.training import SiteState, SiteWork, derive_seed

GradSampleMode = Literal["hooks", "ghost"]


def resolve_grad_sample_mode(mode: str, network: nn.Module) -> GradSampleMode:
    """``"hooks"`` or ``"ghost"``; ``"auto"`` picks ghost when most trainable weights are in ``nn.Linear``.

    Opacus ghost-clips only ``Linear`` (and ``Embedding``) layers: their per-sample gradient
    norms come from activations and backprops without materialising B copies of the weights.
    Other layers (convolutions) get full per-sample gradients under ghost mode too, plus a
    second backward pass, so hooks are faster for convolutional networks. The rule is static
    (not timed) so that the same config always trains the same way (bit-exact resume).
    """
    if mode in ("hooks", "ghost"):
        return mode  # type: ignore[return-value]
    if mode != "auto":
        raise ValueError(f"grad_sample_mode must be 'auto', 'hooks' or 'ghost', got {mode!r}")
    linear = total = 0
    for m in network.modules():
        n = sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
        total += n
        if isinstance(m, nn.Linear):
            linear += n
    return "ghost" if total and linear > total / 2 else "hooks"


@dataclass(frozen=True)
class DPTrainStats:
    """What :func:`dp_train` did. ``empty_batches`` depends on the data: keep it out of reports."""

    steps: int
    epochs: int
    empty_batches: int
    mode: GradSampleMode


def _is_empty(batch: object) -> bool:
    if isinstance(batch, Mapping):
        return len(batch["image"]) == 0
    return len(batch) == 0  # type: ignore[arg-type]  # CollateFnWithEmpty returns [] before its first real batch


def dp_train(
    network: nn.Module,
    dataset: Dataset[dict[str, torch.Tensor]],
    *,
    loss_fn: PerSampleLoss,
    epochs: int,
    sample_rate: float,
    steps_per_epoch: int,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    grad_sample_mode: str = "hooks",
    physical_batch_size: int = 0,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
    prox: Prox | None = None,
    device: torch.device | None = None,
) -> DPTrainStats:
    """Train ``network``'s parameters in place with DP-SGD; see the module docstring.

    ``device`` is where ``network`` lives (default: where its first parameter is); batches move
    there and ``noise_generator`` must be a generator of that device (Opacus draws the noise on
    the gradients' device). Record sampling stays on the CPU (``sampling_generator``).

    The caller accounts ``Mechanism(noise_multiplier, sample_rate, epochs * steps_per_epoch)``.
    Buffers are untouched (a DP-ready network has none that training updates).
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError("cannot train on an empty dataset")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
    mode = resolve_grad_sample_mode(grad_sample_mode, network)
    device = device or next(network.parameters()).device
    work_net = copy.deepcopy(network)  # Opacus attaches hooks and attributes; keep the caller's module clean
    work_net.train()
    params = [p for p in work_net.parameters() if p.requires_grad]
    named = {name: p for name, p in work_net.named_parameters() if p.requires_grad}
    base_opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    expected_batch = n * sample_rate
    optimizer: DPOptimizer
    criterion: DPLossFastGradientClipping | None = None
    if mode == "ghost":
        model: AbstractGradSampleModule = GradSampleModuleFastGradientClipping(
            work_net, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm, use_ghost_clipping=True
        )
        optimizer = DPOptimizerFastGradientClipping(
            base_opt,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch,  # type: ignore[arg-type,unused-ignore]  # a float divisor is fine
            loss_reduction="mean",
            generator=noise_generator,
        )
        criterion = DPLossFastGradientClipping(model, optimizer, loss_fn, "mean")
    else:
        model = GradSampleModule(work_net, batch_first=True, loss_reduction="mean", strict=True)
        optimizer = DPOptimizer(
            base_opt,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch,  # type: ignore[arg-type,unused-ignore]
            loss_reduction="mean",
            generator=noise_generator,
        )
    centre = {k: v.detach().to(device) for k, v in prox.center.items()} if prox is not None and prox.strength > 0 else None
    saved_reduction = loss_fn.reduction
    loss_fn.reduction = "mean"
    steps = empty = 0
    try:
        with warnings.catch_warnings():
            # torch notes that the first layer's hook fires without input gradients; expected with Opacus
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs):
                sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=sampling_generator, steps=steps_per_epoch)
                loader: DataLoader[dict[str, torch.Tensor]] = DataLoader(
                    dataset,
                    batch_sampler=sampler,
                    collate_fn=wrap_collate_with_empty(collate_fn=collate),  # records, or a batch stacked by __getitems__
                    num_workers=0,
                    generator=torch.Generator().manual_seed(0),  # only feeds the loader's unused base seed (not the global RNG)
                )
                if physical_batch_size > 0:
                    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical_batch_size, optimizer=optimizer) as physical:
                        steps_done, empties = _epoch(physical, model, optimizer, loss_fn, mode, params, named, centre, prox, criterion, device)
                else:
                    steps_done, empties = _epoch(loader, model, optimizer, loss_fn, mode, params, named, centre, prox, criterion, device)
                steps += steps_done
                empty += empties
        if steps != epochs * steps_per_epoch:  # every logical step, empty or not, must have happened
            raise RuntimeError(f"DP-SGD took {steps} steps, expected {epochs * steps_per_epoch}")
    finally:
        loss_fn.reduction = saved_reduction
        model._close()  # removes Opacus' hooks and per-parameter attributes
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name in named:
                p.copy_(named[name])
    return DPTrainStats(steps=steps, epochs=epochs, empty_batches=empty, mode=mode)


def _epoch(
    loader: DataLoader[dict[str, torch.Tensor]],
    model: nn.Module,
    optimizer: DPOptimizer,
    loss_fn: PerSampleLoss,
    mode: GradSampleMode,
    params: list[nn.Parameter],
    named: dict[str, nn.Parameter],
    centre: dict[str, torch.Tensor] | None,
    prox: Prox | None,
    criterion: DPLossFastGradientClipping | None,
    device: torch.device,
) -> tuple[int, int]:
    steps = empty = 0
    for batch in loader:
        if _is_empty(batch):
            # No record sampled: the clipped sum is zero. Hand Opacus an empty per-sample
            # gradient (hooks) / a zero summed gradient (ghost); the step below adds the noise.
            empty += 1
            for p in params:
                if mode == "hooks":
                    p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
                else:
                    p.grad = torch.zeros_like(p)
        else:
            x, y = batch["image"].to(device), batch["label"].to(device)
            out = model(x)
            if criterion is not None:
                criterion(out, y).backward()
            else:
                loss_fn(out, y).backward()
        if optimizer.pre_step():  # clip + sum (+ noise + average at the end of a logical batch)
            if centre is not None and prox is not None:
                with torch.no_grad():
                    for name, c in centre.items():
                        p = named[name]
                        p.grad.add_(p.detach() - c, alpha=prox.strength)  # type: ignore[union-attr]
            optimizer.original_optimizer.step()
            steps += 1
        optimizer.zero_grad(set_to_none=True)
    return steps, empty


class DPSiteWork(SiteWork):
    """``SiteWork`` whose ``train`` runs DP-SGD and whose losses go through the loss channel.

    Every call first spends its mechanisms in ``ledger`` (so a crash mid-call still counts)
    and raises :class:`~fedfew_med.dp.ledger.PrivacyBudgetExhausted`, touching no data, when
    they do not fit the budget. Use it for the site step of a round (everything it returns can
    reach the server); evaluation of the deployed model stays on the plain ``SiteWork``.

    Extra parameters
    ----------------
    options
        The site's privacy options (``max_grad_norm``, ``grad_sample_mode``, ``physical_batch_size``, ``loss_clip``).
    calibration
        The site's noise levels and Poisson plan (:func:`fedfew_med.dp.calibrate.calibrate_site`).
    ledger
        The site's ledger for the whole run (mutated in place).
    """

    def __init__(
        self,
        *,
        data: SiteData,
        network: nn.Module,
        initial_buffers: Params,
        state: SiteState,
        training: TrainingConfig,
        seed: int,
        round_idx: int,
        options: PrivacyOptions,
        calibration: Calibration,
        ledger: PrivacyLedger,
    ) -> None:
        super().__init__(
            data=data, network=network, initial_buffers=initial_buffers, state=state, training=training, seed=seed, round_idx=round_idx
        )
        self.options = options
        self.calibration = calibration
        self.ledger = ledger
        self._loss_calls: dict[tuple[str, str], int] = {}
        check_dp_ready(self.network, what=f"site {self.data.name!r}: the network")
        q, s = poisson_plan(self.num_samples, self.training.batch_size) if self.num_samples else (0.0, 0)
        if self.num_samples and q != calibration.sample_rate:
            raise ValueError(
                f"site {self.data.name!r}: calibration was made for sample rate {calibration.sample_rate}, "
                f"but {self.num_samples} records in batches of {self.training.batch_size} give {q}"
            )
        self.sample_rate, self.steps_per_epoch = q, s

    @classmethod
    def wrap(cls, work: SiteWork, *, options: PrivacyOptions, calibration: Calibration, ledger: PrivacyLedger) -> DPSiteWork:
        """The DP version of an existing ``SiteWork`` (same data, network, state, seeds)."""
        return cls(
            options=options,
            calibration=calibration,
            ledger=ledger,
            data=work.data,
            network=work.network,
            initial_buffers=work.initial_buffers,
            state=work.site_state,
            training=work.training,
            seed=work.seed,
            round_idx=work.round_idx,
        )

    def noise_generator(self, slot: str, stream: str = "dp-sgd", index: int = 0) -> torch.Generator:
        """The noise generator of ``slot`` in this round: a sibling of ``generator(slot)``'s seed.

        DP-SGD noise is drawn on the training device (a CUDA generator on a GPU: the same seed
        gives other numbers there than on the CPU); loss-channel noise is drawn on the CPU.
        """
        device = self.device if stream == "dp-sgd" else torch.device("cpu")
        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, self.round_idx, self.data.name, slot, stream, index))

    def train(
        self,
        params: Params,
        *,
        slot: str,
        epochs: int | None = None,
        prox: Prox | None = None,
        from_slot: str | None = None,
    ) -> TrainResult:
        """DP-SGD on a copy of ``params`` for ``epochs`` epochs; the returned loss is private."""
        t = self.training
        epochs = t.local_epochs if epochs is None else epochs
        if self.num_samples == 0:
            raise ValueError(f"site {self.data.name!r} has no training records")
        c = self.calibration
        steps = epochs * self.steps_per_epoch
        self.ledger.spend(
            [
                Mechanism(c.noise_multiplier, self.sample_rate, steps, kind="dp-sgd", round=self.round_idx, label=slot),
                loss_mechanism(c.loss_noise_multiplier, 1, round_idx=self.round_idx, label=f"{slot}:train"),
            ]
        )
        self._load(params, from_slot or slot)
        net = self.network
        loss_fn = PerSampleLoss(self.data.task)
        dp_train(
            net,
            self.data.splits["train"],
            loss_fn=loss_fn,
            epochs=epochs,
            sample_rate=self.sample_rate,
            steps_per_epoch=self.steps_per_epoch,
            noise_multiplier=c.noise_multiplier,
            max_grad_norm=self.options.max_grad_norm,
            lr=t.lr,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            grad_sample_mode=self.options.grad_sample_mode,
            physical_batch_size=self.options.physical_batch_size,
            sampling_generator=self.generator(slot),
            noise_generator=self.noise_generator(slot),
            prox=prox,
            device=self.device,
        )
        self.site_state.buffers[slot] = to_cpu(dict(net.named_buffers()))
        new_params = to_cpu(dict(net.named_parameters()))
        loss = self._private_loss(slot, "train", "train-loss")
        samples = epochs * self.num_samples  # expected records seen (the actual count depends on the data)
        self.samples_seen += samples
        self.steps_taken += steps
        return TrainResult(params=new_params, loss=loss, steps=steps, samples=samples)

    def train_many(self, params: Sequence[Params], *, slots: Sequence[str]) -> list[TrainResult]:
        """DP-SGD on each copy in turn (each a mechanism of its own in the ledger; never one pass)."""
        return [self.train(p, slot=s) for p, s in zip(params, slots, strict=True)]

    def losses(self, params: Sequence[Params], *, slots: Sequence[str], split: str = "train") -> list[float]:
        """Each copy's private loss (:meth:`loss`), one loss-channel release each."""
        return [self.loss(p, slot=s, split=split) for p, s in zip(params, slots, strict=True)]

    def loss(self, params: Params, *, slot: str, split: str = "train") -> float:
        """Private mean loss of ``params`` on ``split`` (a loss-channel release, charged first)."""
        split_ = self._split(split)
        self.ledger.spend([loss_mechanism(self.calibration.loss_noise_multiplier, 1, round_idx=self.round_idx, label=f"{slot}:{split_}")])
        self._load(params, slot)
        return self._private_loss(slot, split_, "loss")

    def _private_loss(self, slot: str, split: str, stream: str) -> float:
        """Loss-channel release of the network as loaded, on ``split`` (already charged by the caller)."""
        dataset = self.data.splits[split]
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"site {self.data.name!r} has no {split} records")
        key = (slot, stream)
        index = self._loss_calls.get(key, 0)
        self._loss_calls[key] = index + 1
        per = per_sample_losses(self.network, dataset, PerSampleLoss(self.data.task), batch_size=max(self.training.batch_size, 64))
        (value,) = private_losses(
            per,
            clip=self.options.loss_clip,
            noise_multiplier=self.calibration.loss_noise_multiplier,
            generator=self.noise_generator(slot, f"{stream}:{split}", index),
        )
        return value
