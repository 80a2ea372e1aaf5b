"""How far can training K copies in one pass go on a CPU? A bound for issue 17's ``one_pass`` ratio.

``[training] one_pass`` trains a site's K copies with ``torch.func.vmap`` over ``functional_call``
(``fedfew_med.training``). On the demo network (MONAI ``Classifier``, channels 8/16/32, 32 × 32 inputs,
batch 32) this script times one SGD step of:

- ``fedavg``: one copy (what a FedAvg site does per batch);
- ``sequential``: the K copies one after another (FedFew without ``one_pass``);
- ``vmap``: the K copies in one vmapped pass, as ``one_pass`` does;
- ``grouped``: the same K copies written by hand in one memory layout, (batch, K × channels, H, W),
  with grouped convolutions, per-copy PReLU weights and a batched final layer: no layout copies between
  layers, which is the most a generic rewrite of vmap could remove;
- ``grouped + fused``: ``grouped`` with each residual unit's two convolutions (they read the same input)
  in one convolution call.

``grouped`` and ``grouped + fused`` are benchmark-only rewrites of this one network: they check that their
outputs and gradients equal the K copies' own to float tolerance before they are timed, so every row does the same
arithmetic. Medians of interleaved repeats; each ratio is against ``fedavg``, measured in the same run.

Usage::

    python benchmarks/one_pass_bound.py            # about a minute at 1 thread
    python benchmarks/one_pass_bound.py --quick    # smoke run: 3 repeats of 5 steps

Writes ``benchmarks/results/one_pass_bound.json`` and ``.md`` (``one_pass_bound_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedfew_med.models import build_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
Params = dict[str, torch.Tensor]


def demo_network(seed: int) -> nn.Module:
    """The demo federation's network (``site_configs/demo_federation.toml``: ``classifier``, 1 × 32 × 32, 2 classes)."""
    return build_model("classifier", {}, task="classification", in_channels=1, num_classes=2, spatial_dims=2,
                       image_size=32, seed=seed)


def units(net: nn.Module) -> list[tuple[str, bool]]:
    """The residual units of a MONAI ``Classifier``: (name prefix, has norm + activation), checked, in order."""
    out = []
    for name, unit in net.net.named_children():  # type: ignore[union-attr]
        sub = list(unit.conv.children())  # type: ignore[union-attr]
        if len(sub) != 1 or not isinstance(unit.residual, nn.Conv2d):
            raise ValueError(f"{name}: this benchmark's rewrite covers residual units of one convolution and a conv residual")
        out.append((f"net.{name}.", hasattr(sub[0], "adn")))
    return out


def stacked(copies: list[nn.Module]) -> Params:
    """The copies' parameters stacked over copies, as new leaves that require grad: name -> (K, *shape)."""
    params, _ = stack_module_state(copies)
    return params


def grouped_forward(p: Params, x: torch.Tensor, layout: list[tuple[str, bool]], k: int, *, fused: bool) -> torch.Tensor:
    """The K copies of the demo ``Classifier`` on one batch, by hand: (B, 1, H, W) -> (B, K, classes).

    Activations stay (B, K × C, H, W) from layer to layer; ``p`` holds each parameter stacked over copies
    (name -> (K, *shape)).
    """
    h, b = x, x.shape[0]
    for i, (pre, adn) in enumerate(layout):
        wu, bu = p[pre + "conv.unit0.conv.weight"], p[pre + "conv.unit0.conv.bias"]  # (K, C, Cin, 3, 3), (K, C)
        wr, br = p[pre + "residual.weight"], p[pre + "residual.bias"]
        c, groups = wu.shape[1], 1 if i == 0 else k  # the first layer reads the one shared input
        if fused and i == 0:  # outputs [unit of every copy | residual of every copy]
            o = F.conv2d(h, torch.cat([wu.flatten(0, 1), wr.flatten(0, 1)]), torch.cat([bu.flatten(), br.flatten()]),
                         stride=2, padding=1)
            a, r = o[:, : k * c], o[:, k * c:]
        elif fused:  # per copy [unit | residual]: one grouped call, then split
            o = F.conv2d(h, torch.cat([wu, wr], 1).flatten(0, 1), torch.cat([bu, br], 1).flatten(), stride=2, padding=1,
                         groups=groups)
            o = o.view(b, k, 2, c, *o.shape[-2:])
            a, r = o[:, :, 0].reshape(b, k * c, *o.shape[-2:]), o[:, :, 1].reshape(b, k * c, *o.shape[-2:])
        else:
            a = F.conv2d(h, wu.flatten(0, 1), bu.flatten(), stride=2, padding=1, groups=groups)
            r = F.conv2d(h, wr.flatten(0, 1), br.flatten(), stride=2, padding=1, groups=groups)
        if adn:  # instance norm is per channel, so per copy; PReLU has one weight per copy
            a = F.instance_norm(a.contiguous())
            a = F.prelu(a, p[pre + "conv.unit0.adn.A.weight"].repeat_interleave(c))
        h = a + r
    w, bias = p["final.1.weight"], p["final.1.bias"]  # (K, classes, features), (K, classes)
    return torch.einsum("bkf,kof->bko", h.reshape(b, k, -1), w) + bias


def grouped_loss(p: Params, x: torch.Tensor, y: torch.Tensor, layout: list[tuple[str, bool]], k: int, *, fused: bool) -> torch.Tensor:
    """Sum over copies of each copy's mean cross-entropy on the batch (each copy's gradient is its own)."""
    out = grouped_forward(p, x, layout, k, fused=fused)  # (B, K, classes)
    per_copy = F.cross_entropy(out.permute(0, 2, 1), y[:, None].expand(-1, k), reduction="none").mean(0)  # (K,)
    return per_copy.sum()


def same_update(copies: list[nn.Module], x: torch.Tensor, y: torch.Tensor, layout: list[tuple[str, bool]]) -> float:
    """Largest difference between one SGD step of each copy on its own and of the hand-written layouts."""
    k, worst = len(copies), 0.0
    for fused in (False, True):
        p = stacked(copies)
        grouped_loss(p, x, y, layout, k, fused=fused).backward()
        for i, c in enumerate(copies):
            c.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(c(x), y).backward()
            for n, q in c.named_parameters():
                worst = max(worst, float((q.grad - p[n].grad[i]).abs().max()))  # type: ignore[index,operator]
            c.zero_grad(set_to_none=True)
    return worst


def steps(k: int, batch: int, seed: int) -> tuple[dict[str, Callable[[], None]], float]:
    """One SGD step of each row, on the same batch and starting copies; and the largest difference of the
    hand-written layouts to the copies' own outputs and gradients."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 1, 32, 32, generator=g), torch.randint(0, 2, (batch,), generator=g)
    copies = [demo_network(seed + i) for i in range(k)]
    opts = [torch.optim.SGD(c.parameters(), lr=0.01) for c in copies]
    loss_fn = nn.CrossEntropyLoss()
    layout = units(copies[0])

    with torch.no_grad():
        own = torch.stack([c(x) for c in copies], 1)  # (B, K, classes)
        p0 = stacked(copies)
        diff = max(float((grouped_forward(p0, x, layout, k, fused=f) - own).abs().max()) for f in (False, True))
    diff = max(diff, same_update(copies, x, y, layout))

    def one(i: int) -> Callable[[], None]:
        def step() -> None:
            opts[i].zero_grad(set_to_none=True)
            loss_fn(copies[i](x), y).backward()
            opts[i].step()
        return step

    pv = stacked(copies)
    opt_v = torch.optim.SGD(list(pv.values()), lr=0.01)
    net = copies[0]
    batched = vmap(lambda p, xx, yy: loss_fn(functional_call(net, p, (xx,)), yy), in_dims=(0, None, None))

    def vmapped() -> None:
        opt_v.zero_grad(set_to_none=True)
        batched(pv, x, y).sum().backward()
        opt_v.step()

    def grouped(fused: bool) -> Callable[[], None]:
        pg = stacked(copies)
        opt = torch.optim.SGD(list(pg.values()), lr=0.01)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            grouped_loss(pg, x, y, layout, k, fused=fused).backward()
            opt.step()
        return step

    each = [one(i) for i in range(k)]

    def sequential() -> None:
        for step in each:
            step()

    rows = {"fedavg": each[0], "sequential": sequential,
            "vmap": vmapped, "grouped": grouped(False), "grouped + fused": grouped(True)}
    return rows, diff


def median_ms(fn: Callable[[], None], n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def measure(k: int, batch: int, repeats: int, n: int, seed: int) -> dict[str, Any]:
    rows, diff = steps(k, batch, seed)
    for fn in rows.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):  # interleaved, so that load on the machine falls on every row alike
        for name, fn in rows.items():
            times[name].append(median_ms(fn, n))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"k": k, "batch": batch, "repeats": repeats, "steps_per_repeat": n, "threads": torch.get_num_threads(),
            "max_output_difference": diff, "step_ms": med,
            "ratio_to_fedavg": {name: v / med["fedavg"] for name, v in med.items()},
            "ratio_quartiles": {name: statistics.quantiles([a / b for a, b in zip(v, times["fedavg"], strict=True)], n=4)
                                for name, v in times.items()} if repeats >= 2 else {}}


def to_markdown(res: dict[str, Any]) -> str:
    lines = ["# One pass over K copies: how far it can go on a CPU", "",
             f"Demo network (MONAI Classifier 8/16/32, 1 × 32 × 32, 2 classes), K = {res['k']}, batch {res['batch']}, "
             f"{res['threads']} thread(s), torch {torch.__version__}; medians of {res['repeats']} interleaved repeats of "
             f"{res['steps_per_repeat']} steps. Hand-written rows equal the copies' own outputs and gradients to "
             f"{res['max_output_difference']:.1e}. Command: `python benchmarks/one_pass_bound.py`.", "",
             "| one SGD step of | ms | / fedavg | quartiles of the per-repeat ratio |", "|---|---|---|---|"]
    for name, ms in res["step_ms"].items():
        q = res["ratio_quartiles"].get(name)
        lines.append(f"| {name} | {ms:.2f} | {res['ratio_to_fedavg'][name]:.2f} | "
                     f"{f'{q[0]:.2f} – {q[2]:.2f}' if q else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per repeat and row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repeats of 5 steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats, n = (3, 5) if args.quick else (args.repeats, args.steps)
    res = measure(args.k, args.batch, repeats, n, args.seed)
    if res["max_output_difference"] > 1e-4:
        raise SystemExit(f"the hand-written layout differs from the copies by {res['max_output_difference']:.2e}: not the same arithmetic")
    md = to_markdown(res)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "one_pass_bound_quick" if args.quick else "one_pass_bound"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(md)


if __name__ == "__main__":
    main()
