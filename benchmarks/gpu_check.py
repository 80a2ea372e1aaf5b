"""GPU check: the same rounds on cuda and on the CPU, bf16 against fp32, and the one-pass speed-up on the GPU.

Run by ``benchmarks/gpu_check.sh`` on a machine with a CUDA GPU (about 5 minutes); writes
``gpu.json`` and ``gpu.md`` into ``--out``. Every figure is measured within this one run:

- for the synthetic segmentation federation and Br35H (when ``data/br35h`` is there): 2 rounds
  on ``cpu`` and on ``cuda`` at fp32 (test mean of each and their difference; seconds per round),
  and on ``cuda`` at ``bf16``, in the default memory layout and with ``channels_last`` (difference to fp32);
- FedFew K = 3 round time on ``cuda``: K sequential passes / ``one_pass``, and / FedAvg.

``--allow-cpu`` runs the same code with ``cuda`` replaced by ``cpu`` (a smoke test of this
script on a machine without a GPU; its figures say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import _median_round  # noqa: E402

from fedfew_med.config import load_federation  # noqa: E402
from fedfew_med.simulation import run  # noqa: E402

FEDERATIONS: dict[str, tuple[Path, list[str]]] = {  # name -> (federation file, --set overrides)
    "segmentation": (ROOT / "site_configs" / "synthetic_segmentation.toml", []),
    "br35h": (ROOT / "site_configs" / "br35h_federation.toml", []),
}


def rounds_on(name: str, device: str, precision: str, rounds: int, channels_last: bool = False) -> dict[str, Any]:
    """``rounds`` rounds of federation ``name`` on ``device`` at ``precision`` (and memory layout): test mean, s/round."""
    source, overrides = FEDERATIONS[name]
    cfg = load_federation(source, [*overrides, f"run.rounds={rounds}", f"run.eval_every={rounds}",
                                   f"training.device='{device}'", f"training.precision='{precision}'",
                                   f"training.channels_last={str(channels_last).lower()}"])
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = run(cfg, run_dir=Path(tmp) / "r")
        seconds = time.perf_counter() - t
    return {"device": result.summary["compute"]["device"], "precision": precision + (" channels_last" if channels_last else ""),
            "mean": result.summary["summary"]["mean"],
            "worst": result.summary["summary"]["worst"], "seconds_per_round": seconds / rounds}


def one_pass_speedup(device: str, rounds: int) -> dict[str, Any]:
    """FedFew K = 3 demo round on ``device``: sequential / one pass, and each / FedAvg."""
    demo = ROOT / "site_configs" / "demo_federation.toml"
    base = [f"training.device='{device}'"]
    seq = _median_round(load_federation(demo, [*base, "algorithm.name='fedfew'", "algorithm.params={k=3}"]), rounds)
    one = _median_round(load_federation(demo, [*base, "algorithm.name='fedfew'", "algorithm.params={k=3}", "training.one_pass=true"]), rounds)
    avg = _median_round(load_federation(demo, [*base, "algorithm.name='fedavg'", "algorithm.params={}"]), rounds)
    return {"device": device, "sequential_s": seq, "one_pass_s": one, "fedavg_s": avg, "one_pass_speedup": seq / one,
            "fedfew_over_fedavg": seq / avg, "one_pass_over_fedavg": one / avg, "rounds": rounds}


def to_markdown(res: dict[str, Any]) -> str:
    lines = ["# GPU check", "", f"Device: {res['gpu']}; torch {res['torch']}; command `bash benchmarks/gpu_check.sh`.", "",
             "| federation | run | test mean | worst | s/round | mean − cpu fp32 |", "|---|---|---|---|---|---|"]
    for name, rows in res["federations"].items():
        ref = rows["cpu-32"]["mean"]
        for row in rows.values():
            lines.append(f"| {name} | {row['device']} {row['precision']} | {row['mean']:.3f} | {row['worst']:.3f} | "
                         f"{row['seconds_per_round']:.2f} | {row['mean'] - ref:+.3f} |")
    o = res["one_pass"]
    lines += ["", f"FedFew K = 3 demo round on {o['device']} (medians of {o['rounds']}): sequential {o['sequential_s']:.3f} s, "
              f"one pass {o['one_pass_s']:.3f} s (speed-up {o['one_pass_speedup']:.2f}x), FedAvg {o['fedavg_s']:.3f} s; "
              f"FedFew / FedAvg {o['fedfew_over_fedavg']:.2f} sequential, {o['one_pass_over_fedavg']:.2f} with one pass."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--allow-cpu", action="store_true", help="smoke test without a GPU (cuda replaced by cpu)")
    args = parser.parse_args()
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.allow_cpu:
        print("gpu_check: torch sees no CUDA GPU here (use --allow-cpu for a smoke test of this script)", file=sys.stderr)
        return 2
    gpu = "cuda" if has_cuda else "cpu"
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if has_cuda else "none (--allow-cpu smoke test)",
                           "torch": torch.__version__, "federations": {}}
    names = [n for n in FEDERATIONS if n != "br35h" or (ROOT / "data" / "br35h" / "federation.toml").exists()]
    for name in names:
        res["federations"][name] = {
            "cpu-32": rounds_on(name, "cpu", "32", args.rounds),
            "gpu-32": rounds_on(name, gpu, "32", args.rounds),
            "gpu-bf16": rounds_on(name, gpu, "bf16", args.rounds),
            "gpu-bf16-channels-last": rounds_on(name, gpu, "bf16", args.rounds, channels_last=True),
        }
        print(json.dumps({name: res["federations"][name]}), flush=True)
    res["one_pass"] = one_pass_speedup(gpu, rounds=3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "gpu.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
