"""Speed benchmark: what fedfew-med costs on top of the training it runs.

Every figure is a ratio or a measurement taken within one run of this script:

- framework overhead: one FedFew round through the simulator (send, local training of
  K copies per site, validation, streaming aggregation) divided by a bare PyTorch loop
  doing the same local training on the same tensors (target <= 1.05);
- scaling: round time and server peak memory for M sites with K = 3 on a small model;
  the server folds replies in as they arrive, so its memory grows with K, not M;
- data loading: share of a round spent waiting on data (target < 10%);
- DP overhead: time per local epoch with Opacus (hooks and ghost clipping) divided by
  the same epoch without DP (when the DP module is present);
- FedFew K = 3 round / FedAvg round on the same federation (FedFew trains K copies per site
  and scores them: the price of K models);
- ``--workers 2``: a simulated round with the sites split over 2 processes (1 thread each)
  against 1 process at 2 threads, same numbers to the bit (``tests/test_site_pool.py``);
- the papers' network (``pflcnn``, Fashion-MNIST, 20 sites): a FedFew round through the simulator, in the
  default memory layout and with ``[training] channels_last``, against a plain sequential PyTorch loop;
- CLI start-up: ``fedfew-med --help`` (and ``simulate --help``) against ``python -c pass``.

Usage::

    python benchmarks/speed.py            # full
    python benchmarks/speed.py --quick    # a minute or two on 2 cores (CI smoke test)

Writes ``benchmarks/results/speed.json`` and ``speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedfew_med.algorithms import SiteReply  # noqa: E402
from fedfew_med.config import federation_from_dict, load_federation  # noqa: E402
from fedfew_med.data import build_sites  # noqa: E402
from fedfew_med.runtime import ModelFacts, ServerRuntime, make_algorithm  # noqa: E402
from fedfew_med.simulation import Federation  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEMO = ROOT / "site_configs" / "demo_federation.toml"


def machine() -> dict[str, Any]:
    """Where the figures came from."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def simulator_round(fed: Federation, r: int) -> None:
    """One round through the simulator's own path (worker processes too, once started), without evaluation."""
    info = fed.round_info(r, fed.participants(r))
    step = fed.server.begin_aggregation(info)
    for site, outcome in fed.site_steps(info.participants, info):
        if isinstance(outcome, Exception):
            raise outcome
        step.add(site, outcome[0])
    fed.server.finish(step)


def _median_time(round_fn: Callable[[int], None], rounds: int) -> float:
    """Median wall time of ``round_fn(r)`` over ``rounds`` rounds, after an untimed warm-up round 0."""
    times = []
    for r in range(rounds + 1):
        t = time.perf_counter()
        round_fn(r)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def bare_round(fed: Federation, r: int) -> None:
    """The same local training written as a plain PyTorch loop over the same tensors."""
    cfg = fed.config.training
    for site in fed.sites.values():
        ds = site.data.splits["train"]
        x, y = ds.images, ds.labels  # type: ignore[attr-defined]
        net = site.network
        for k, model in enumerate(fed.server.models):
            net.load_state_dict(model, strict=False)
            net.train()
            opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
            g = torch.Generator().manual_seed(r * 1000 + k)
            for _ in range(cfg.local_epochs):
                order = torch.randperm(len(x), generator=g)
                for i in range(0, len(x), cfg.batch_size):
                    idx = order[i : i + cfg.batch_size]
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                    opt.step()
            _ = {n: p.detach().clone() for n, p in net.named_parameters()}  # the returned copy


def overhead(rounds: int) -> dict[str, Any]:
    """Median simulator round time / median bare-loop round time, interleaved to share drift."""
    cfg = load_federation(DEMO)
    fed = Federation(cfg, build_sites(cfg.data))
    simulator_round(fed, 0)
    bare_round(fed, 0)  # warm-up
    ours, bare = [], []
    for r in range(1, rounds + 1):
        t = time.perf_counter()
        simulator_round(fed, r)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        bare_round(fed, r)
        bare.append(time.perf_counter() - t)
    pairs = sorted(a / b for a, b in zip(ours, bare, strict=True))  # each round's ratio: how much the figure moves
    q1, _, q3 = statistics.quantiles(pairs, n=4)
    return {
        "simulator_round_s": statistics.median(ours),
        "bare_round_s": statistics.median(bare),
        "ratio": statistics.median(ours) / statistics.median(bare),
        "ratio_per_round_quartiles": [q1, q3],
        "rounds": rounds,
        "federation": "demo (6 sites, K=3, MONAI Classifier 32x32)",
    }


class _TimedLoader:
    """Iterates a DataLoader and adds the time spent waiting for each batch to ``acc[0]``."""

    def __init__(self, loader: Any, acc: list[float]) -> None:
        self.loader, self.acc = loader, acc

    def __iter__(self) -> Any:
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.acc[0] += time.perf_counter() - t
                return
            self.acc[0] += time.perf_counter() - t
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def data_loading(config: Path, rounds: int) -> dict[str, Any]:
    """Share of simulator rounds spent waiting for batches, measured inside the rounds themselves.

    Every site's ``loader`` is wrapped so that each ``next(batch)`` is timed while the round runs
    (training of the K copies and the loss passes); the share is that time over the round time.
    The first round is untimed (it fills MONAI's cache of the deterministic transforms).
    """
    cfg = load_federation(config)
    sites = build_sites(cfg.data, source=cfg.source)
    acc = [0.0]
    for site in sites:  # SiteData is frozen: the wrapper goes on the instance
        original = site.loader
        object.__setattr__(site, "loader", lambda *a, _o=original, **kw: _TimedLoader(_o(*a, **kw), acc))
    fed = Federation(cfg, sites)
    simulator_round(fed, 0)
    acc[0] = 0.0
    total = 0.0
    for r in range(1, rounds + 1):
        t = time.perf_counter()
        simulator_round(fed, r)
        total += time.perf_counter() - t
    return {"fetch_s": acc[0], "round_s": total, "share": acc[0] / total, "rounds": rounds,
            "federation": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
            "records": sum(s.size("train") for s in sites)}


def _scaling_child(num_sites: int, k: int) -> dict[str, Any]:
    """Run in a fresh process: M tiny sites train and reply one after another; report time and peak RSS."""
    cfg = federation_from_dict(
        {
            "run": {"rounds": 1, "seed": 0},
            "algorithm": {"name": "fedfew", "params": {"k": k}},
            "training": {"batch_size": 8, "lr": 0.05},
            # the pFL two-convolution CNN at 16 x 16: ~2.3 MB of parameters, so buffering M x K replies would show
            "model": {"name": "smallcnn", "params": {"hidden": 512}},
            "data": {"name": "synthetic", "params": {"num_sites": 1, "image_size": 16, "train_min": 8, "train_max": 8,
                                                      "test_per_site": 4, "val_fraction": 0.0}},
        }
    )
    site = build_sites(cfg.data)[0]
    algorithm, models = make_algorithm(cfg, ModelFacts.of(site))
    server = ServerRuntime(cfg, algorithm, models)
    fed = Federation(cfg, [site])
    runtime = fed.sites[site.name]
    names = [f"site{i:05d}" for i in range(num_sites)]
    info = server.round_info(0, {n: 8 for n in names})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    step = server.begin_aggregation(info)
    for n in names:  # every site trains its K copies on its own (here: identical, tiny) data and replies
        sent = server.models_for(n, info)
        reply = algorithm.local_round(n, info, sent, runtime.work(0))
        step.add(n, SiteReply(num_samples=reply.num_samples, losses=reply.losses, models=reply.models))
    server.finish(step)
    seconds = time.perf_counter() - t
    model_bytes = sum(t.numel() * t.element_size() for t in models[0].values())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the whole process, at its peak (Linux: KiB)
    return {
        "sites": num_sites,
        "k": k,
        "round_s": seconds,
        # growth of the process's peak during the round: 0 when the round never exceeds the set-up's own peak
        "peak_rss_growth_mb": (peak_kb - rss_before) / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "model_kb": model_bytes / 1024,
        "replies_if_buffered_mb": num_sites * k * model_bytes / 2**20,
    }


def scaling(sizes: list[int], k: int) -> list[dict[str, Any]]:
    """Each M in its own process, so peak RSS is that run's own."""
    rows = []
    for m in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--scaling-child", str(m), "--k", str(k), "--threads", str(torch.get_num_threads())],
            capture_output=True, text=True, check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def dp_overhead(epochs: int) -> dict[str, Any] | None:
    """Time per local epoch with DP (hooks, ghost) / without, if the DP module provides the timing."""
    try:
        from fedfew_med.dp import benchmark_epoch_times
    except ImportError as exc:
        print(f"DP overhead skipped: fedfew_med.dp.benchmark_epoch_times is not available ({exc})", file=sys.stderr)
        return None
    return dict(benchmark_epoch_times(DEMO, epochs=epochs))


def _median_round(cfg: Any, rounds: int, workers: int = 1, sites: Any = None) -> float:
    """Median wall time of ``rounds`` simulator rounds (after a warm-up round), sites on ``workers`` processes.

    ``sites`` are in-memory sites (default: built from ``cfg.data``).
    """
    fed = Federation(cfg, sites if sites is not None else build_sites(cfg.data, source=cfg.source))
    fed.start_workers(workers)
    try:
        return _median_time(lambda r: simulator_round(fed, r), rounds)
    finally:
        fed.close()


def k_models_cost(rounds: int) -> dict[str, Any]:
    """FedFew K = 3 round (K passes, and one pass) / FedAvg round on the demo federation, one algorithm after another."""
    fedfew = load_federation(DEMO, ["algorithm.name='fedfew'", "algorithm.params={k=3}"])
    fedavg = load_federation(DEMO, ["algorithm.name='fedavg'", "algorithm.params={}"])
    one_pass = load_federation(DEMO, ["algorithm.name='fedfew'", "algorithm.params={k=3}", "training.one_pass=true"])
    a, b, c = _median_round(fedfew, rounds), _median_round(fedavg, rounds), _median_round(one_pass, rounds)
    return {"fedfew_round_s": a, "fedavg_round_s": b, "ratio": a / b, "one_pass_round_s": c, "one_pass_ratio": c / b,
            "one_pass_speedup": a / c, "rounds": rounds, "federation": "demo (6 sites)"}


def workers_speedup(rounds: int) -> dict[str, Any]:
    """1 process at 2 threads / 2 worker processes at 1 thread each: the same FedFew K = 3 demo rounds."""
    cfg = load_federation(DEMO)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one = _median_round(cfg, rounds, workers=1)
        two = _median_round(cfg, rounds, workers=2)
    finally:
        torch.set_num_threads(saved)
    return {"one_process_2_threads_s": one, "two_workers_1_thread_s": two, "speedup": one / two, "rounds": rounds,
            "federation": "demo (6 sites, FedFew K=3)"}


def paper_round(rounds: int, records: int) -> dict[str, Any] | None:
    """The issue-17 work on the pFL papers' network: Fashion-MNIST, 20 sites (Dirichlet 0.1), FedFew K = 3, lr 0.005,
    batch 50, ``pflcnn``. A FedFew round through the simulator (1 process at 1 thread; 2 workers at 1 thread each),
    in the default memory layout and with ``[training] channels_last``, against a plain sequential PyTorch loop doing
    the same K trainings per site in the default layout (at 1 and at 2 threads). Medians."""
    from fedfew_med.datasets.fashion_mnist import fashion_mnist_sites

    try:
        sites = fashion_mnist_sites(num_sites=20, scheme="dirichlet", alpha=0.1, seed=0, max_records=records)
    except FileNotFoundError as exc:
        print(f"paper-network round skipped: {exc}", file=sys.stderr)
        return None

    def config(channels_last: bool) -> Any:
        return federation_from_dict({
            "run": {"rounds": rounds + 1, "seed": 0},
            "algorithm": {"name": "fedfew", "params": {"k": 3}},
            "training": {"local_epochs": 1, "lr": 0.005, "batch_size": 50, "channels_last": channels_last},
            "model": {"name": "pflcnn", "params": {"hidden": 512}},
            "data": {"name": "synthetic", "params": {}},  # placeholder: the sites are passed in memory
        })

    saved = torch.get_num_threads()

    def ours(workers: int, channels_last: bool) -> float:
        torch.set_num_threads(1)
        return _median_round(config(channels_last), rounds, workers, sites=sites)

    def bare(threads: int) -> float:
        torch.set_num_threads(threads)
        fed = Federation(config(False), sites)  # fresh networks in the default layout
        return _median_time(lambda r: bare_round(fed, r), rounds)

    try:
        seq, two = ours(1, False), ours(2, False)
        seq_cl, two_cl = ours(1, True), ours(2, True)
        bare1, bare2 = bare(1), bare(2)
    finally:
        torch.set_num_threads(saved)
    return {"records": records, "rounds": rounds, "ours_1_thread_s": seq, "ours_2_workers_s": two, "bare_1_thread_s": bare1,
            "bare_2_threads_s": bare2, "ratio_sequential": seq / bare1, "ratio_workers_vs_bare_1_thread": two / bare1,
            "ratio_workers_vs_bare_2_threads": two / bare2,
            "channels_last_1_thread_s": seq_cl, "channels_last_2_workers_s": two_cl,
            "ratio_channels_last_sequential": seq_cl / bare1, "ratio_channels_last_workers_vs_bare_2_threads": two_cl / bare2}


def cli_startup(repeats: int) -> dict[str, Any]:
    """Median wall time of ``fedfew-med --help`` / ``simulate --help`` and of ``python -c pass`` (fresh processes)."""
    def median_of(cmd: list[str]) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    bare = median_of([sys.executable, "-c", "pass"])
    top = median_of([sys.executable, "-m", "fedfew_med.cli", "--help"])
    sim = median_of([sys.executable, "-m", "fedfew_med.cli", "simulate", "--help"])
    return {"python_pass_s": bare, "help_s": top, "simulate_help_s": sim, "extra_s": max(top, sim) - bare, "repeats": repeats}


def to_markdown(res: dict[str, Any]) -> str:
    o, d = res["overhead"], res["data_loading"]
    lines = [
        "# Speed benchmark",
        "",
        f"Machine: {res['machine']['platform']}, {res['machine']['cpus']} CPUs, {res['machine']['threads']} torch thread(s), "
        f"torch {res['machine']['torch']}.",
        f"Command: `python benchmarks/speed.py{' --quick' if res['quick'] else ''}`.",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| framework overhead (simulator round / bare PyTorch loop, medians of {o['rounds']} interleaved rounds) | "
        f"{o['ratio']:.3f} ({o['simulator_round_s']:.3f} s / {o['bare_round_s']:.3f} s; per-round ratio quartiles "
        + (" – ".join(f"{q:.3f}" for q in o["ratio_per_round_quartiles"]) if "ratio_per_round_quartiles" in o else "n/a")
        + ") | <= 1.05 |",
        f"| data loading share of a round ({d['federation']}, {d['records']} training records) | {100 * d['share']:.1f}% "
        f"({d['fetch_s']:.2f} s of {d['round_s']:.2f} s) | < 10% |",
    ]
    if res.get("dp"):
        for mode, ratio in res["dp"]["ratios"].items():
            fastest = res["dp"].get("ratios_min", {}).get(mode)
            extra = f" (fastest epochs: {fastest:.2f})" if fastest is not None else ""
            lines.append(f"| DP overhead, {mode} (median epoch time / non-DP) | {ratio:.2f}{extra} | |")
    else:
        lines.append("| DP overhead | not measured (fedfew_med.dp.benchmark_epoch_times unavailable) | |")
    if res.get("k_models"):
        k = res["k_models"]
        lines.append(f"| FedFew K = 3 round / FedAvg round ({k['federation']}, medians of {k['rounds']} rounds) | {k['ratio']:.2f} "
                     f"({k['fedfew_round_s']:.3f} s / {k['fedavg_round_s']:.3f} s) | |")
        lines.append(f"| FedFew K = 3 round with `one_pass` / FedAvg round | {k['one_pass_ratio']:.2f} ({k['one_pass_round_s']:.3f} s) "
                     "| <= 1.8 (issue 17) |")
        lines.append(f"| one-pass speed-up (FedFew K = 3 round, K sequential passes / one pass) | {k['one_pass_speedup']:.2f}x | |")
    if res.get("workers"):
        w = res["workers"]
        lines.append(f"| `--workers 2` speed-up ({w['federation']}; 1 process at 2 threads / 2 processes at 1 thread, "
                     f"medians of {w['rounds']} rounds) | {w['speedup']:.2f}x ({w['one_process_2_threads_s']:.3f} s / "
                     f"{w['two_workers_1_thread_s']:.3f} s) | |")
    if res.get("paper"):
        q = res["paper"]
        lines.append(f"| papers' network round (Fashion-MNIST {q['records']} records, 20 sites, FedFew K = 3, pflcnn, batch 50): "
                     f"simulator / plain PyTorch loop, both 1 thread | {q['ratio_sequential']:.2f} ({q['ours_1_thread_s']:.2f} s / "
                     f"{q['bare_1_thread_s']:.2f} s) | |")
        lines.append(f"| the same with `--workers 2` (1 thread each) / plain loop at 1 thread; / plain loop at 2 threads | "
                     f"{q['ratio_workers_vs_bare_1_thread']:.2f}; {q['ratio_workers_vs_bare_2_threads']:.2f} ({q['ours_2_workers_s']:.2f} s; "
                     f"{q['bare_2_threads_s']:.2f} s) | |")
        if "ratio_channels_last_sequential" in q:
            lines.append(f"| the same with `[training] channels_last`: 1 thread / plain loop at 1 thread; `--workers 2` / plain loop "
                         f"at 2 threads | {q['ratio_channels_last_sequential']:.2f}; {q['ratio_channels_last_workers_vs_bare_2_threads']:.2f} "
                         f"({q['channels_last_1_thread_s']:.2f} s; {q['channels_last_2_workers_s']:.2f} s) | <= 0.8 (issue 17) |")
    if res.get("cli"):
        c = res["cli"]
        lines.append(f"| CLI start-up (`--help`, `simulate --help`) beyond `python -c pass`, medians of {c['repeats']} | "
                     f"+{c['extra_s']:.2f} s ({c['help_s']:.2f} s, {c['simulate_help_s']:.2f} s against {c['python_pass_s']:.2f} s) | < 1 s |")
    model_kb = res["scaling"][0]["model_kb"] if res["scaling"] else 0.0
    lines += ["", f"Scaling (K = 3, smallcnn of {model_kb / 1024:.1f} MB, 8 records per site, one round, replies folded in as they "
              "arrive; peak RSS of the whole process, sites included, and its growth during the round: 0 means the "
              "round never went above what setting up the server and one site took):", "",
              "| sites M | round time (s) | process peak RSS (MB) | peak RSS growth in the round (MB) | all replies buffered would be (MB) |",
              "|---|---|---|---|---|"]
    for row in res["scaling"]:
        lines.append(f"| {row['sites']} | {row['round_s']:.2f} | {row.get('peak_rss_mb', float('nan')):.1f} | "
                     f"{row['peak_rss_growth_mb']:.1f} | {row['replies_if_buffered_mb']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sites (CI smoke test)")
    parser.add_argument("--scaling-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on shared cores)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="site counts M for the scaling figure")
    parser.add_argument("--data-config", type=Path, default=None,
                        help="federation for the data-loading share (default: the Br35H demo if data/br35h exists, else the synthetic demo)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.scaling_child:
        print(json.dumps(_scaling_child(args.scaling_child, args.k)))
        return
    quick = args.quick
    res: dict[str, Any] = {"machine": machine(), "quick": quick}
    res["overhead"] = overhead(rounds=3 if quick else 30)
    data_config = args.data_config
    if data_config is None:
        br35h = ROOT / "site_configs" / "br35h_federation.toml"
        data_config = br35h if not quick and (ROOT / "data" / "br35h" / "federation.toml").exists() else DEMO
    res["data_loading"] = data_loading(data_config, rounds=2 if quick else 3)
    res["scaling"] = scaling(args.sizes or ([10, 100] if quick else [10, 100, 1000]), k=3)
    res["dp"] = dp_overhead(epochs=1 if quick else 3)
    res["k_models"] = k_models_cost(rounds=1 if quick else 5)
    res["workers"] = workers_speedup(rounds=1 if quick else 5)
    res["paper"] = paper_round(rounds=1 if quick else 3, records=3000 if quick else 14000)
    res["cli"] = cli_startup(repeats=3 if quick else 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "speed_quick" if quick else "speed"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{name}.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
