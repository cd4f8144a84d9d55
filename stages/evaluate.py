"""Stage ``evaluate``: score one trained model on every evaluation split (LAVT's protocol)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from semires import annotations
from semires.atomic import atomic_path, write_json
from semires.data import ExpressionDataset
from semires.errors import SemiresError
from semires.train import evaluate as evaluate_model
from semires.train import load_model
from stages.common import DEFAULT_PARAMS, AnnsOption, ParamsOption, log, stage_command
from stages.params import DatasetParams, check, check_loader, section


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """evaluate.*: how checkpoints are scored (LAVT's protocol by default)."""

    batch_size: int = 16
    resolution: str = "input"  # input: at the model's input size (the paper's); original: image size
    splits: list[str] | None = None  # null: every split but train that the dataset has
    num_workers: int | None = None  # DataLoader workers; null: auto (none on the CPU)
    image_cache_mb: int = 128  # decoded images kept per loading process

    def __post_init__(self) -> None:
        check_loader("evaluate", self.num_workers, self.image_cache_mb)
        check(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "expected a positive batch size")
        check(
            self.resolution in ("input", "original"),
            "evaluate.resolution",
            self.resolution,
            "expected input (the paper's protocol) or original",
        )
        check(
            self.splits is None or (len(self.splits) > 0 and "train" not in self.splits),
            "evaluate.splits",
            self.splits,
            "expected null or a non-empty list of eval splits, e.g. [val, testA, testB]",
        )


@stage_command("evaluate")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Model checkpoint (e.g. data/burn_in/5/model.pt).")],
    name: Annotated[str, typer.Option(help="The model's key in the metrics, e.g. burn_in/5.")],
    metrics_path: Annotated[
        Path, typer.Option("--metrics", help="{model: {split: {oIoU, mIoU, prec@..}}} JSON (a DVC metric).")
    ],
    results_path: Annotated[
        Path, typer.Option("--results", help="Per-expression results, one JSON object a line.")
    ],
    anns_path: AnnsOption = Path("data/anns.json"),
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Every expression of val/testA/testB (those the dataset has): oIoU, mIoU, prec@0.5-0.9."""
    ep = section(params, "evaluate", EvaluateParams)
    dp = section(params, "dataset", DatasetParams)
    anns = annotations.load(anns_path)
    splits = ep.splits or [s for s in anns.splits() if s != "train"]
    missing = [s for s in splits if s not in anns.splits()]
    if missing:
        raise SemiresError(
            f"params.yaml: evaluate.splits names {missing}, which {anns_path} does not have "
            f"(it has {anns.splits()}); fix the list or set it to null"
        )
    spec, model, ckpt = load_model(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tok = spec.make_tokenizer()
    metrics: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    with atomic_path(results_path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for split in splits:
            data = ExpressionDataset(
                anns.in_split(split),
                dp.image_dir,
                tok,
                image_size=spec.config.image_size,
                max_tokens=spec.config.max_tokens,
                cache_mb=ep.image_cache_mb,
            )
            ev = evaluate_model(
                model, data, device=device, batch_size=ep.batch_size, resolution=ep.resolution,
                num_workers=ep.num_workers,
            )  # fmt: skip
            metrics[split] = ev.metrics
            for r in ev.results:
                row = {
                    "model": name,
                    "split": split,
                    "ref_id": r.ref_id,
                    "sent_id": r.sent_id,
                    "image_id": r.image_id,
                    "sentence": r.sentence,
                    "I": r.inter,
                    "U": r.union,
                    "IoU": round(r.iou, 6),
                }
                f.write(json.dumps(row) + "\n")
            m = ev.metrics
            log(
                "evaluate",
                f"{name} {split}: {m['count']} expressions, oIoU {m['oIoU']:.2f} mIoU {m['mIoU']:.2f} "
                f"prec@0.5 {m['prec@0.5']:.2f} prec@0.9 {m['prec@0.9']:.2f}",
            )
    write_json(metrics_path, {name: metrics})
    log("evaluate", f"{name} (step {ckpt.step}) in {time.perf_counter() - start:.1f} s -> {metrics_path}")
