"""Stage ``evaluate``: score one trained model on every evaluation split (LAVT's protocol).

Three outputs: ``--metrics``, the headline that ``dvc metrics show`` prints as one row per
model (val oIoU and mIoU; the student's beside the teacher's; pseudo-label quality);
``--scores``, every metric of every split of every network (what the report reads);
``--results``, one line per expression.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from semires import annotations
from semires.atomic import atomic_path, write_json
from semires.data import ExpressionDataset
from semires.errors import SemiresError
from semires.inference import load_networks
from semires.logits import PRECISIONS
from semires.train import eval_loader
from semires.train import evaluate as evaluate_model
from stages.common import DEFAULT_PARAMS, AnnsOption, ParamsOption, log, stage_command
from stages.params import DatasetParams, check, check_loader, section


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """evaluate.*: how checkpoints are scored (LAVT's protocol by default)."""

    batch_size: int = 16
    resolution: str = "input"  # input: at the model's input size (the paper's); original: image size
    splits: list[str] | None = None  # null: every split but train that the dataset has
    precision: str = "fp32"  # fp32 (the paper's) | bf16 (autocast: faster on a GPU)
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
            self.precision in PRECISIONS,
            "evaluate.precision",
            self.precision,
            "expected fp32 (the paper's) or bf16 (autocast, faster on a GPU)",
        )
        check(
            self.splits is None or (len(self.splits) > 0 and "train" not in self.splits),
            "evaluate.splits",
            self.splits,
            "expected null or a non-empty list of eval splits, e.g. [val, testA, testB]",
        )


HEADLINE_DIGITS = 2


def end_quality(path: Path) -> dict[str, float]:
    """The end-of-training pseudo-label metrics in a train_semi ``pseudo_labels.json``
    (``{<method>/<percent>: {start: {...}, end: {...}}}``); empty for the control's ``{}``."""
    fix = "rerun the train_semi stage that writes it (`dvc repro`)"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SemiresError(f"{path}: pseudo-label quality file not found; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SemiresError(f"{path}: not readable JSON ({e}); {fix}") from e
    phases = next(iter(obj.values()), {}) if isinstance(obj, dict) and len(obj) == 1 else None
    end = phases.get("end", {}) if isinstance(phases, dict) else None
    if not isinstance(end, dict) or not all(isinstance(v, int | float) for v in end.values()):
        raise SemiresError(
            f"{path}: not a pseudo-label quality file (expected {{<method>/<percent>: {{start: ..., "
            f"end: {{metric: number}}}}}}); {fix}"
        )
    return end


def headline(
    scores: dict[str, dict[str, dict[str, float]]], quality: dict[str, float] | None
) -> dict[str, dict[str, float]]:
    """The few numbers `dvc metrics show` prints for one model: oIoU and mIoU on val (else the
    first split evaluated) of the teacher (or the only network), the student's beside them,
    and the end-of-training pseudo-label mIoU raw and refined.

    ``scores``: network -> split -> metric, networks in the order teacher, student or model.
    """
    first, *rest = scores
    split = "val" if "val" in scores[first] else next(iter(scores[first]))
    row = {k: round(scores[first][split][k], HEADLINE_DIGITS) for k in ("oIoU", "mIoU")}
    for network in rest:
        row |= {f"{network}_{k}": round(scores[network][split][k], HEADLINE_DIGITS) for k in ("oIoU", "mIoU")}
    out = {split: row}
    end = quality or {}
    if "raw_mIoU" in end and "refined_mIoU" in end:
        out["pseudo"] = {k: round(end[k], HEADLINE_DIGITS) for k in ("raw_mIoU", "refined_mIoU")}
    return out


@stage_command("evaluate")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Model checkpoint (e.g. data/burn_in/5/model.pt).")],
    name: Annotated[str, typer.Option(help="The model's name in the outputs, e.g. burn_in/5.")],
    metrics_path: Annotated[
        Path,
        typer.Option(
            "--metrics",
            help="The headline (a DVC metric): val oIoU/mIoU of the teacher (or the only network), "
            "the student's, and with --quality the pseudo-label mIoU.",
        ),
    ],
    scores_path: Annotated[
        Path,
        typer.Option(
            "--scores", help="Every metric of every split of every network: oIoU, mIoU, prec@0.5-0.9, count."
        ),
    ],
    results_path: Annotated[
        Path, typer.Option("--results", help="Per-expression results, one JSON object a line.")
    ],
    quality_path: Annotated[
        Path | None,
        typer.Option("--quality", help="pseudo_labels.json of the train_semi run, for the headline."),
    ] = None,
    anns_path: AnnsOption = Path("data/anns.json"),
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Every expression of val/testA/testB (those the dataset has): oIoU, mIoU, prec@0.5-0.9.

    A teacher-student checkpoint is scored twice: its EMA teacher (the model the method
    delivers, as the official code saves and evaluates it) and its student.
    """
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
    quality = end_quality(quality_path) if quality_path is not None else None
    networks = load_networks(checkpoint)
    first = next(iter(networks.values()))
    spec, tok = first.spec, first.tokenizer
    scores: dict[str, dict[str, dict[str, float]]] = {net: {} for net in networks}
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
            # one loader (and worker pool) per split, for the teacher and the student alike
            loader = eval_loader(
                data, batch_size=ep.batch_size, device=first.device, num_workers=ep.num_workers
            )
            for net, model in networks.items():
                ev = evaluate_model(
                    model.network, data, device=model.device, resolution=ep.resolution, loader=loader,
                    precision=ep.precision,
                )  # fmt: skip
                scores[net][split] = ev.metrics
                for r in ev.results:
                    row = {
                        "model": name,
                        "network": net,
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
                    f"{name} {net} {split}: {m['count']} expressions, oIoU {m['oIoU']:.2f} "
                    f"mIoU {m['mIoU']:.2f} prec@0.5 {m['prec@0.5']:.2f} prec@0.9 {m['prec@0.9']:.2f}",
                )
    write_json(
        scores_path,
        {"model": name, "checkpoint": str(checkpoint), "step": first.step, "resolution": ep.resolution,
         "precision": ep.precision, "networks": scores},
    )  # fmt: skip
    write_json(metrics_path, headline(scores, quality))
    log(
        "evaluate",
        f"{name} ({', '.join(networks)}, step {first.step}) in {time.perf_counter() - start:.1f} s -> "
        f"{metrics_path}, {scores_path}",
    )
