"""Everything needed to start a secure Flower federation, as files and argument lists.

- :func:`make_credentials`: a private CA, the SuperLink's TLS certificate (signed by
  it, valid for the given host names and IP addresses) and one EC P-384 key pair
  per site in OpenSSH format (what ``flower-supernode --auth-supernode-private-key``
  and ``flwr supernode register`` read).
- :func:`superlink_command`, :func:`supernode_command`, :func:`flwr_run_command`,
  :func:`register_command`: the Flower command lines, secure by default. TLS and
  SuperNode authentication are always on unless ``insecure=True`` is asked for
  explicitly, and then a warning is logged.
- :func:`write_connection`: the ``flwr`` CLI's connection file (``$FLWR_HOME/config.toml``).

Nothing here starts a process; the CLI and the tests do.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "app"
"""The Flower App (``pyproject.toml`` only) that ``flwr run`` bundles."""

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
INSECURE_WARNING = (
    "insecure mode: TLS and SuperNode authentication are OFF; model updates travel in clear text and any "
    "machine that can reach the SuperLink can join. Use this only on a closed test network."
)


@dataclass(frozen=True)
class Credentials:
    """Where :func:`make_credentials` put each file."""

    root: Path
    ca_cert: Path  # give to every SuperNode and to the flwr CLI (public)
    ca_key: Path  # keep offline: it signs server certificates
    server_cert: Path  # the SuperLink's
    server_key: Path  # the SuperLink's (secret)
    node_keys: Mapping[str, tuple[Path, Path]]  # site -> (private key: that site only, public key: register it)


def make_credentials(
    out_dir: str | Path,
    *,
    sites: Sequence[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    valid_days: int = 365,
    overwrite: bool = False,
) -> Credentials:
    """Create a CA, a SuperLink certificate for ``hosts`` and a key pair per site under ``out_dir``.

    Parameters
    ----------
    out_dir
        Directory to create (``ca.crt``, ``ca.key``, ``server.pem``, ``server.key``,
        ``nodes/<site>`` and ``nodes/<site>.pub``). Secret files get mode 0600.
    sites
        Site names (letters, digits, ``.``, ``_``, ``-``), one key pair each.
    hosts
        Names and IP addresses the SuperLink is reached at (subject alternative names).
    valid_days
        Validity of the CA and the server certificate.
    overwrite
        Replace existing files; by default existing credentials are never overwritten.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not sites:
        raise ValueError("make_credentials needs at least one site name")
    for s in sites:
        if not _NAME.match(s):
            raise ValueError(f"site name must use only letters, digits, '.', '_' and '-', got {s!r}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names must be unique, got {list(sites)}")
    if not hosts:
        raise ValueError("make_credentials needs at least one host name or IP address for the SuperLink")
    root = Path(out_dir)
    creds = Credentials(
        root=root,
        ca_cert=root / "ca.crt",
        ca_key=root / "ca.key",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        node_keys={s: (root / "nodes" / s, root / "nodes" / f"{s}.pub") for s in sites},
    )
    existing = [p for p in _all_paths(creds) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True (--overwrite) to replace the credentials in {root}")
    (root / "nodes").mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock differences
    until = now + dt.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfew-med federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    alt_names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt_names.append(x509.DNSName(h))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    _write(creds.ca_cert, ca_cert.public_bytes(pem), secret=False)
    _write(creds.ca_key, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), secret=True)
    _write(creds.server_cert, server_cert.public_bytes(pem), secret=False)
    _write(creds.server_key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
           secret=True)
    for site, (private, public) in creds.node_keys.items():
        key = ec.generate_private_key(ec.SECP384R1())
        _write(private, key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), secret=True)
        openssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(public, openssh + f" {site}\n".encode(), secret=False)
    return creds


def _all_paths(creds: Credentials) -> list[Path]:
    return [creds.ca_cert, creds.ca_key, creds.server_cert, creds.server_key] + [p for pair in creds.node_keys.values() for p in pair]


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------ commands
def flower_executable(name: str) -> str:
    """``name`` (``flower-superlink``, ``flwr``...) next to this Python, else on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(base: Mapping[str, str] | None = None, *, flwr_home: str | Path | None = None) -> dict[str, str]:
    """An environment for Flower processes: this Python's ``bin`` first on PATH (the SuperLink and
    SuperNodes start ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name),
    ``FLWR_HOME`` if given, and Flower's telemetry off unless the environment turns it on."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    # No telemetry: Flower would otherwise call out to its servers from a hospital's network and wait
    # up to 4 s for it at every process exit. A user who wants it sets FLWR_TELEMETRY_ENABLED=1.
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def superlink_command(
    *,
    credentials: Credentials | None,
    host: str = "127.0.0.1",
    port: int = 9091,
    database: str | Path | None = None,
    insecure: bool = False,
) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication, no run-time installs, and a database.

    One port serves the Fleet API (SuperNodes), the Control API (``flwr run``,
    ``flwr supernode register``) and the Runtime API (the ServerApp). ``database``
    keeps registered SuperNodes and runs across SuperLink restarts (in memory if None).
    """
    cmd = [flower_executable("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if insecure:
        log.warning("SuperLink: %s", INSECURE_WARNING)
        cmd += ["--insecure"]
    else:
        if credentials is None:
            raise ValueError("a secure SuperLink needs credentials (make_credentials); pass insecure=True only for closed test networks")
        cmd += ["--ssl-ca-certfile", str(credentials.ca_cert), "--ssl-certfile", str(credentials.server_cert),
                "--ssl-keyfile", str(credentials.server_key), "--enable-supernode-auth"]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(
    *,
    superlink: str,
    node_config: Mapping[str, str | int | float | bool],
    root_certificates: str | Path | None = None,
    private_key: str | Path | None = None,
    runtime_port: int = 9094,
    insecure: bool = False,
    max_wait_time: float | None = None,
) -> list[str]:
    """``flower-supernode`` for one site: TLS to the SuperLink, signed with the site's key.

    ``runtime_port`` is the SuperNode's local Runtime API (on 127.0.0.1; its
    ClientApp processes connect to it): give each SuperNode on one machine its own.
    ``node_config`` is the site's ``--node-config`` (see ``fedfew_med.flower.node``).
    """
    cmd = [flower_executable("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port),
           "--node-config", config_arg(node_config)]
    if insecure:
        log.warning("SuperNode: %s", INSECURE_WARNING)
        cmd += ["--insecure"]
    else:
        if root_certificates is None or private_key is None:
            raise ValueError("a secure SuperNode needs the CA certificate and the site's private key; "
                             "pass insecure=True only for closed test networks")
        cmd += ["--root-certificates", str(root_certificates), "--auth-supernode-private-key", str(private_key)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", f"{max_wait_time:g}"]
    return cmd


def register_command(public_key: str | Path, connection: str) -> list[str]:
    """``flwr supernode register``: allow the SuperNode holding the matching private key to connect."""
    return [flower_executable("flwr"), "supernode", "register", str(public_key), connection]


def flwr_run_command(connection: str, run_config: Mapping[str, str | int | float | bool], *, stream: bool = False) -> list[str]:
    """``flwr run`` of the FedFew app (:data:`APP_DIR`) on a SuperLink connection."""
    cmd = [flower_executable("flwr"), "run", str(APP_DIR), connection, "--run-config", config_arg(run_config)]
    return cmd + (["--stream"] if stream else [])


def config_arg(values: Mapping[str, str | int | float | bool]) -> str:
    """``key="value" n=3 flag=true`` as Flower's ``--node-config`` / ``--run-config`` parse it."""
    parts = []
    for key, value in values.items():
        if not re.match(r"^[A-Za-z0-9_-]+$", key):
            raise ValueError(f"config key must use letters, digits, '_' and '-', got {key!r}")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            if '"' in value:  # Flower's parser reads a quoted value up to the next double quote
                raise ValueError(f"{key}: value {value!r} cannot hold a double quote")
            text = json.dumps(value)  # a TOML basic string
        parts.append(f"{key}={text}")
    return " ".join(parts)


def write_connection(
    flwr_home: str | Path,
    name: str,
    *,
    address: str,
    root_certificates: str | Path | None = None,
    insecure: bool = False,
    default: bool = True,
) -> Path:
    """Add (or replace) SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``; other entries are kept."""
    import tomllib

    import tomli_w

    if not _NAME.match(name):
        raise ValueError(f"connection name must use letters, digits, '.', '_' and '-', got {name!r}")
    entry: dict[str, str | bool] = {"address": address}
    if insecure:
        log.warning("flwr connection %s: %s", name, INSECURE_WARNING)
        entry["insecure"] = True
    else:
        if root_certificates is None:
            raise ValueError("a secure connection needs the CA certificate; pass insecure=True only for closed test networks")
        entry["root-certificates"] = str(Path(root_certificates).resolve())  # the flwr CLI wants an absolute path
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    data = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    section = data.setdefault("superlink", {})
    section[name] = entry
    if default or "default" not in section:
        section["default"] = name
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path
