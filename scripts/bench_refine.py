"""Benchmark: batched refinement vs the public code's per-mask loop.

    python scripts/bench_refine.py [--device cuda] [--batch 8] [--masks 100] [--size 480]

Prints milliseconds per batch for both, checks that their outputs are identical, and on a
CUDA device checks that the batched path never synchronises with the host.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from semires.refine import RefineConfig, pwa_weights, refine


def loop_refine(prob: torch.Tensor, proposals: torch.Tensor, strategy: str) -> torch.Tensor:
    """The public training scripts' refinement: Python loops over samples and masks."""
    c = (prob > 0.5).long()
    out = torch.zeros_like(c)
    for b in range(prob.shape[0]):
        hit = False
        top, best = 0.0, None
        for s in proposals[b].long():
            inter = (s * c[b]).sum()
            if strategy == "cpi":
                if inter / (c[b].sum() + 1e-9) > 0.7 or inter / s.sum() > 0.7:  # host sync per mask
                    out[b][s.bool()] = 1
                    hit = True
            else:
                iou = inter / (s + c[b] - s * c[b]).sum()
                if iou > 0.5 and iou > top:
                    top, best = iou, s
        if strategy == "iom" and best is not None:
            out[b][best.bool()] = 1
            hit = True
        if not hit:
            out[b] = c[b]
    pwa_weights(prob)
    return out


def _timeit(fn, device, repeat):
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--masks", type=int, default=100)
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    b, n, s = args.batch, args.masks, args.size
    prob = torch.nn.functional.interpolate(torch.rand(b, 1, 8, 8, generator=g), size=(s, s), mode="bilinear")[
        :, 0
    ]
    low = torch.rand(b, n, 6, 6, generator=g)
    props = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear") > 0.55
    prob, props = prob.to(device), props.to(device)
    valid = torch.ones(b, n, dtype=torch.bool, device=device)
    rows = []
    for strategy in ("iom", "cpi"):
        cfg = RefineConfig(strategy=strategy)
        batched = refine(prob, props, valid, cfg).labels
        looped = loop_refine(prob, props, strategy)
        same = torch.equal(batched, looped)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # raises if the batched path syncs
            refine(prob, props, valid, cfg)
            torch.cuda.set_sync_debug_mode(0)
        t_batched = _timeit(lambda cfg=cfg: refine(prob, props, valid, cfg), device, args.repeat)
        t_loop = _timeit(lambda strategy=strategy: loop_refine(prob, props, strategy), device, args.repeat)
        rows.append((strategy, t_loop, t_batched, same))
    print(f"refinement, batch {b} x {n} proposals at {s}x{s} on {device} ({torch.get_num_threads()} threads)")
    print(f"{'strategy':<9}{'loop ms':>10}{'batched ms':>12}{'speed-up':>10}  identical")
    for strategy, t_loop, t_batched, same in rows:
        print(f"{strategy:<9}{t_loop:>10.1f}{t_batched:>12.1f}{t_loop / t_batched:>9.1f}x  {same}")


if __name__ == "__main__":
    main()
