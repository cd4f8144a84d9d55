"""Benchmark: one LAVT training step (forward, weighted cross-entropy, backward, AdamW).

    python scripts/bench_model.py [--preset tiny] [--batch 16] [--steps 30] [--repeat 5] [--device cpu]
                                  [--threads N]

Random images and masks at the preset's input size, sentences from a small fixed corpus.
Prints, for each repeat, the median milliseconds per step of wall time and of this process's
CPU time, and the best of each. On a CPU shared with other work, the CPU time with
``--threads 1`` is the steadier figure (time spent waiting for a core is not counted).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from semires.model.build import prepare, preset
from semires.train import make_optimizer, segmentation_loss

CORPUS = [
    "the red circle on the left",
    "the big blue square",
    "the green shape above the triangle",
    "small yellow triangle at the bottom right next to the purple square",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec, model = prepare(preset(args.preset), corpus=CORPUS)
    model.to(device).train()
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-2)
    s, t = spec.config.image_size, spec.config.max_tokens
    sentences = [CORPUS[i % len(CORPUS)] for i in range(args.batch)]
    ids, att = spec.make_tokenizer().encode(sentences, t)
    image = torch.rand(args.batch, 3, s, s, device=device)
    mask = (torch.rand(args.batch, s, s, device=device) > 0.5).long()
    ids, att = ids.to(device), att.to(device)

    def step() -> None:
        loss = segmentation_loss(model(image, ids, att), mask, (0.9, 1.1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    wall, cpu = [], []
    for _ in range(args.repeat):
        w, c = [], []
        for _ in range(args.steps):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync()
            w.append((time.perf_counter() - t0) * 1000)
            c.append((time.process_time() - c0) * 1000)
        wall.append(statistics.median(w))
        cpu.append(statistics.median(c))
    print(
        f"{args.preset} LAVT, batch {args.batch}, {s} px, {device}, {torch.get_num_threads()} thread(s), "
        f"ms/step medians: wall {', '.join(f'{m:.1f}' for m in wall)} (best {min(wall):.1f}); "
        f"CPU {', '.join(f'{m:.1f}' for m in cpu)} (best {min(cpu):.1f})"
    )


if __name__ == "__main__":
    main()
