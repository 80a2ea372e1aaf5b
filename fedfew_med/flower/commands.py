"""The ``fedfew-med flower ...`` subcommands: secure Flower deployments in a few steps.

``fedfew_med.cli`` wires them with ``add_parser(sub, out=print)``; the library never
prints, it hands its lines to ``out``. The long-running steps (``superlink``,
``supernode``) run the Flower executable as a child and stay in front of it
(:func:`fedfew_med.flower.supervise.supervise`): SIGTERM, SIGINT (Ctrl-C) and SIGHUP (as
SIGTERM) are passed on to Flower, and once it has stopped (killed after a grace period) so is every
process it started (SuperExec, ServerApp, ClientApps); a log file gets Flower's lines
without colour codes.

=============  =============================================================================
credentials    CA, SuperLink certificate, one key pair per site (run once, by the coordinator)
superlink      start the SuperLink: TLS + SuperNode authentication + SQLite state
connect        tell the ``flwr`` CLI where the SuperLink is (``$FLWR_HOME/config.toml``)
register       allow a site's public key to connect (``flwr supernode register``)
supernode      start one hospital's SuperNode with its site data and state directory
run            start (or resume) a FedFew run with ``flwr run``
=============  =============================================================================

``superlink``, ``supernode`` and ``run`` take ``--policy POLICY.toml`` (the privacy officer's
policy, e.g. ``privacy/policy.toml``): as ``simulate --policy`` refuses a federation whose sites
break it, these refuse to start when the deployment breaks its TLS or site-authentication rules
(:func:`fedfew_med.privacy.check_deployment`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedfew_med.config import ConfigError, load_federation
from fedfew_med.flower import launch

Out = Callable[[str], None]


def add_parser(subparsers: Any, *, out: Out) -> argparse.ArgumentParser:
    """Add the ``flower`` command and its steps to an argparse ``subparsers`` object."""
    flower = subparsers.add_parser(
        "flower",
        help="deploy across hospitals on Flower (SuperLink, SuperNodes, TLS, authenticated sites)",
        description="Run a federation across machines with Flower. Secure by default: TLS everywhere and only "
        "registered SuperNodes may connect; --insecure (closed test networks only) turns both off. "
        "See docs/deployment.md.",
    )
    steps = flower.add_subparsers(dest="flower_command", required=True, metavar="STEP")

    p = steps.add_parser("credentials", help="create a CA, the SuperLink's certificate and one key pair per site")
    p.add_argument("out", help="directory to create (keep ca.key offline; give each site only its own key)")
    p.add_argument("--site", action="append", required=True, metavar="NAME", help="a site name; repeat for every site")
    p.add_argument("--host", action="append", metavar="HOST",
                   help="a name or IP address the SuperLink is reached at; repeatable (default: localhost 127.0.0.1 ::1)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    p.add_argument("--overwrite", action="store_true", help="replace existing credentials in OUT")
    p.set_defaults(func=lambda a: _credentials(a, out))

    p = steps.add_parser("superlink", help="start the SuperLink (stops with everything it started)")
    _security(p, node=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9091, help="port of the Fleet, Control and Runtime APIs (default 9091)")
    p.add_argument("--database", help="SQLite file keeping registered SuperNodes and runs across restarts "
                                      "(default: superlink.db in the credentials directory)")
    p.set_defaults(func=lambda a: _superlink(a, out))

    p = steps.add_parser("connect", help="save a SuperLink connection for the flwr CLI ($FLWR_HOME/config.toml)")
    p.add_argument("name", help="connection name, used by `register` and `run`")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--ca", help="the federation's CA certificate (ca.crt)")
    p.add_argument("--insecure", action="store_true", help="no TLS (closed test networks only)")
    p.add_argument("--flwr-home", help="Flower's home directory (default $FLWR_HOME or ~/.flwr)")
    p.set_defaults(func=lambda a: _connect(a, out))

    p = steps.add_parser("register", help="allow SuperNodes to connect, by their public keys")
    p.add_argument("connection", help="connection name (see `connect`)")
    p.add_argument("public_keys", nargs="+", metavar="PUBLIC_KEY", help="nodes/<site>.pub files")
    p.add_argument("--flwr-home", help="Flower's home directory (default $FLWR_HOME or ~/.flwr)")
    p.set_defaults(func=lambda a: _register(a, out))

    p = steps.add_parser("supernode", help="start this site's SuperNode (stops with everything it started)")
    _security(p, node=True)
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--state-dir", required=True, help="where this site keeps its state between rounds and restarts")
    p.add_argument("--site-config", help="this site's config file (fedfew_med.data.sites)")
    p.add_argument("--federation-config", help="a federation config whose SITE_INDEX-th site this is (demos)")
    p.add_argument("--site-index", type=int, help="with --federation-config")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="local port for the SuperNode's ClientApp processes (one per SuperNode on a machine; default 9094)")
    p.set_defaults(func=lambda a: _supernode(a, out))

    p = steps.add_parser("nodes", help="which SuperNode id serves which site in a run (from the coordinator's run directory)",
                         description="Flower lists SuperNodes by numeric id (`flwr supernode ls`); the coordinator learns "
                         "which site each id serves and keeps it in RUN_DIR/nodes.json. Example: "
                         "fedfew-med flower nodes runs/flower-demo")
    p.add_argument("run_dir", help="the run directory given to `flower run --run-dir`")
    p.set_defaults(func=lambda a: _nodes(a, out))

    p = steps.add_parser("run", help="start or resume a FedFew run on the federation (flwr run)")
    p.add_argument("connection", help="connection name (see `connect`)")
    p.add_argument("--federation-config", required=True, help="the federation config, as seen from the SuperLink's machine")
    p.add_argument("--run-dir", required=True, help="run directory on the SuperLink's machine")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    p.add_argument("--min-sites", type=int, help="fewest valid replies a round needs (default 1)")
    p.add_argument("--expected-sites", type=int, help="before round 0, wait for this many SuperNodes")
    p.add_argument("--connect-timeout", type=float, help="seconds to wait for SuperNodes (default 120)")
    p.add_argument("--query-timeout", type=float, help="seconds to wait for new sites to describe themselves (default 60)")
    p.add_argument("--round-timeout", type=float, help="seconds to wait for one phase's replies (default 600)")
    p.add_argument("--stop-after", type=int, help="stop after N rounds (resume later)")
    p.add_argument("--stream", action="store_true", help="follow the run's log")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the federation config (TOML syntax, single quotes for strings), "
                   "e.g. --set training.lr=0.02 --set \"algorithm.name='fedavg'\"; repeatable, as `simulate --set`")
    _policy(p)
    p.add_argument("--flwr-home", help="Flower's home directory (default $FLWR_HOME or ~/.flwr)")
    p.set_defaults(func=lambda a: _run(a, out))
    return flower


def _security(p: argparse.ArgumentParser, *, node: bool) -> None:
    if node:
        p.add_argument("--ca", help="the federation's CA certificate (ca.crt)")
        p.add_argument("--key", help="this site's private key (nodes/<site>)")
    else:
        p.add_argument("--credentials", help="the directory made by `fedfew-med flower credentials`")
    p.add_argument("--insecure", action="store_true",
                   help="turn off TLS and SuperNode authentication (closed test networks only; logs a warning)")
    _policy(p)


def _policy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", metavar="POLICY.toml",
                   help="refuse to start when this deployment breaks the privacy policy's TLS or authentication rules, "
                   "e.g. privacy/policy.toml")


def enforce_deployment(policy_path: str | None, *, tls: bool, authenticated: bool, what: str) -> None:
    """``check_deployment`` of the policy at ``policy_path`` (if any); PolicyViolation naming every broken rule.

    Worded as ``simulate --policy``: ``<what> breaks the privacy policy <file> (<name>); nothing was started:``
    followed by one line per broken rule.
    """
    if not policy_path:
        return
    from fedfew_med.privacy import PolicyViolation, check_deployment, load_policy

    policy = load_policy(policy_path)
    broken = [v for v in check_deployment(policy, tls=tls, authenticated=authenticated) if v.ok is False]
    if broken:
        lines = "\n  ".join(v.message() for v in broken)
        raise PolicyViolation(f"{what} breaks the privacy policy {policy.source} ({policy.name}); nothing was started:\n  {lines}", broken)


# ------------------------------------------------------------------------ handlers
def _credentials(args: argparse.Namespace, out: Out) -> int:
    try:
        creds = launch.make_credentials(args.out, sites=args.site, hosts=args.host or ("localhost", "127.0.0.1", "::1"),
                                        valid_days=args.days, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        raise ConfigError(str(exc)) from None
    out(f"CA certificate (for every SuperNode and the flwr CLI): {creds.ca_cert}")
    out(f"CA private key (keep offline):                        {creds.ca_key}")
    out(f"SuperLink certificate and key:                        {creds.server_cert}, {creds.server_key}")
    for site, (private, public) in creds.node_keys.items():
        out(f"site {site}: private key {private} (to that site only), public key {public} (register it)")
    return 0


def credentials_from_dir(directory: str | Path, sites: Sequence[str] = ()) -> launch.Credentials:
    """The files of a ``credentials`` directory (node keys found under ``nodes/``)."""
    root = Path(directory)
    if not (root / "ca.crt").is_file():
        raise ConfigError(f"{root} holds no ca.crt; create it with `fedfew-med flower credentials`")
    names = list(sites) or sorted(p.stem for p in (root / "nodes").glob("*.pub"))
    return launch.Credentials(root=root, ca_cert=root / "ca.crt", ca_key=root / "ca.key", server_cert=root / "server.pem",
                              server_key=root / "server.key",
                              node_keys={s: (root / "nodes" / s, root / "nodes" / f"{s}.pub") for s in names})


def _superlink(args: argparse.Namespace, out: Out) -> int:
    secure = not args.insecure  # TLS and SuperNode authentication go together
    enforce_deployment(args.policy, tls=secure, authenticated=secure, what=f"this SuperLink{'' if secure else ' (--insecure)'}")
    creds = None
    if not args.insecure:
        if not args.credentials:
            raise ConfigError("superlink needs --credentials DIR (or --insecure on a closed test network)")
        creds = credentials_from_dir(args.credentials)
    database = args.database or (Path(args.credentials) / "superlink.db" if args.credentials else None)
    cmd = launch.superlink_command(credentials=creds, host=args.host, port=args.port, database=database,
                                   insecure=args.insecure)
    return _exec(cmd, launch.flower_env(), out)


def _connect(args: argparse.Namespace, out: Out) -> int:
    if not args.insecure and not args.ca:
        raise ConfigError("connect needs --ca ca.crt (or --insecure on a closed test network)")
    path = launch.write_connection(_flwr_home(args), args.name, address=args.superlink, root_certificates=args.ca,
                                   insecure=args.insecure)
    out(f"connection {args.name!r} -> {args.superlink} saved in {path}")
    return 0


def _register(args: argparse.Namespace, out: Out) -> int:
    env = launch.flower_env(flwr_home=_flwr_home(args))
    for key in args.public_keys:
        done = subprocess.run(launch.register_command(Path(key).resolve(), args.connection), env=env, check=False)
        if done.returncode != 0:
            return int(done.returncode)
        out(f"registered {key}")
    return 0


def _supernode(args: argparse.Namespace, out: Out) -> int:
    if args.site_config and (args.federation_config or args.site_index is not None):
        raise ConfigError("give either --site-config, or --federation-config with --site-index")
    node_config: dict[str, str | int] = {"state-dir": str(Path(args.state_dir).resolve())}
    if args.site_config:
        node_config["site-config"] = str(Path(args.site_config).resolve())
    elif args.federation_config and args.site_index is not None:
        node_config["federation-config"] = str(Path(args.federation_config).resolve())
        node_config["site-index"] = args.site_index
    else:
        raise ConfigError("supernode needs --site-config FILE, or --federation-config FILE --site-index N")
    secure = not args.insecure
    enforce_deployment(args.policy, tls=secure, authenticated=secure, what=f"this SuperNode{'' if secure else ' (--insecure)'}")
    if not args.insecure and not (args.ca and args.key):
        raise ConfigError("supernode needs --ca ca.crt and --key nodes/<site> (or --insecure on a closed test network)")
    problems = _check_site(node_config, out)
    if problems:
        return problems
    _check_superlink(args.superlink, out)
    cmd = launch.supernode_command(superlink=args.superlink, node_config=node_config, root_certificates=args.ca,
                                   private_key=args.key, runtime_port=args.runtime_port, insecure=args.insecure)
    return _exec(cmd, launch.flower_env(), out)


def _nodes(args: argparse.Namespace, out: Out) -> int:
    import json

    path = Path(args.run_dir) / "nodes.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: the coordinator writes it once SuperNodes have described their sites")
    doc = json.loads(path.read_text())
    out(f"{'node id':>20}  {'site':<20} {'training records':>16}  status")
    for row in doc["sites"]:
        node = "-" if row["node_id"] is None else str(row["node_id"])
        out(f"{node:>20}  {row['site']:<20} {row['n_train']:>16}  {row['status']}")
    for node in doc.get("refused_node_ids", []):
        out(f"{node:>20}  {'(refused for this run: see the coordinator log)'}")
    return 0


def _check_site(node_config: dict[str, str | int], out: Out) -> int:
    """Load and validate this site's data before anything connects: 0, or 1 with every problem printed.

    A missing or invalid site / federation file raises ConfigError (exit 2), naming the file and key.
    """
    from fedfew_med.flower.node import NodeConfigError, NodeSettings

    settings = NodeSettings.from_node_config(node_config)
    if settings.site_config is not None:
        from fedfew_med.data.validate import validate_site

        report = validate_site(settings.site_config)
        if not report.ok:
            out(report.format())
            out(f"this SuperNode was not started: the data of {settings.site_config} has problems (see above; "
                "`fedfew-med validate-site` shows the same report)")
            return 1
        return 0
    try:
        site = settings.load_site()
    except NodeConfigError as exc:
        raise ConfigError(str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        out(f"this SuperNode was not started: site {settings.site_index} of {settings.federation_config}: {exc}")
        return 1
    out(f"site {site.name!r}: {site.size('train')} training records")
    return 0


def _check_superlink(address: str, out: Out, timeout: float = 3.0) -> bool:
    """Whether the SuperLink at ``HOST:PORT`` accepts a TCP connection now; when not, a line naming it and the cause.

    Not an error: a SuperNode may start first and keeps retrying (Flower's own log then only says
    that a connection attempt failed, without the address).
    """
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        out(f"warning: the SuperLink at {address} cannot be reached now ({cause}); the SuperNode starts anyway "
            "and keeps retrying: check the address, that the SuperLink runs, and the firewall")
        return False


def _run(args: argparse.Namespace, out: Out) -> int:
    if args.policy:  # the connection's own security (a fedfew-med SuperLink authenticates sites whenever it has TLS)
        secure = not connection_insecure(_flwr_home(args), args.connection)
        enforce_deployment(args.policy, tls=secure, authenticated=secure,
                           what=f"connection {args.connection!r}{'' if secure else ' (insecure)'}")
    run_config: dict[str, str | int | float | bool] = {
        "federation-config": str(Path(args.federation_config).resolve()),
        "run-dir": str(Path(args.run_dir).resolve()),
        **transport_facts(_flwr_home(args), args.connection),  # recorded by the coordinator for the privacy report
    }
    for flag in ("resume", "overwrite"):
        if getattr(args, flag):
            run_config[flag] = True
    for attr in ("min_sites", "expected_sites", "connect_timeout", "query_timeout", "round_timeout", "stop_after"):
        value = getattr(args, attr)
        if value is not None:
            run_config[attr.replace("_", "-")] = value
    if args.set:
        quoted = [o for o in args.set if '"' in o]
        if quoted:  # Flower's --run-config reads a quoted value up to the next double quote
            raise ConfigError(f"--set {quoted[0]!r}: use single quotes for TOML strings here, e.g. \"algorithm.name='fedavg'\"")
        load_federation(args.federation_config, args.set)  # a bad key or value fails here, not on the SuperLink
        run_config["set"] = "\n".join(args.set)
    cmd = launch.flwr_run_command(args.connection, run_config, stream=args.stream)
    return _exec(cmd, launch.flower_env(flwr_home=_flwr_home(args)), out)  # Ctrl-C reaches flwr; a log file gets no colour codes


def transport_facts(flwr_home: Path, name: str) -> dict[str, str | bool]:
    """The run-config keys ``tls``, ``node-auth`` and ``launched-by``: what this launcher knows of the transport.

    TLS is the ``flwr`` connection's own: ``flwr run`` reaches the SuperLink's port, which serves the
    SuperNodes too, with TLS verified against the connection's CA certificate, or without TLS
    (``insecure``). SuperNode authentication goes with TLS: ``fedfew-med flower superlink`` enables it
    whenever it runs with TLS, and Flower refuses it without TLS. The coordinator records the three
    (:mod:`fedfew_med.flower.transport`). An unknown connection gives none (``flwr run`` reports it).
    """
    try:
        insecure = connection_insecure(flwr_home, name)
    except ConfigError:
        return {}
    how = (f"fedfew-med flower run over flwr connection '{name}': "
           + ("insecure (no TLS; Flower admits SuperNodes without authentication then)" if insecure else
              "TLS, the SuperLink's certificate verified against the connection's CA; SuperNode authentication "
              "as `fedfew-med flower superlink` runs it with TLS (--enable-supernode-auth)"))
    return {"tls": not insecure, "node-auth": not insecure, "launched-by": how}


def connection_insecure(flwr_home: Path, name: str) -> bool:
    """Whether the flwr CLI's connection ``name`` (``$FLWR_HOME/config.toml``) is insecure; ConfigError if unknown."""
    import tomllib

    path = flwr_home / "config.toml"
    data = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    entry = data.get("superlink", {}).get(name)
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: no SuperLink connection {name!r}; save it with `fedfew-med flower connect {name} ...`")
    return bool(entry.get("insecure", False))


def _flwr_home(args: argparse.Namespace) -> Path:
    if args.flwr_home:
        return Path(args.flwr_home)
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def _exec(cmd: list[str], env: dict[str, str], out: Out) -> int:
    """Run a long-lived Flower service (SuperLink, SuperNode) until it ends or is stopped; its exit status."""
    from fedfew_med.flower.supervise import supervise  # stdlib only, but not needed for --help

    out(" ".join(cmd))
    try:
        return supervise(cmd, env=env)
    except FileNotFoundError:
        raise ConfigError(f"{cmd[0]} was not found: install fedfew-med (with flwr) in this environment") from None
