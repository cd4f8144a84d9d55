"""Stage ``report``: the results table, the training curves and a pseudo-label figure.

Writes into one folder, replaced as a whole (a failed run leaves the previous report):
``results.md`` / ``results.csv`` (Table 1 on whatever was trained, pseudo-label quality),
``curves.png`` (train loss, val mIoU, pseudo-label mIoU raw vs refined) and
``pseudo_labels.png`` (unlabeled samples: ground truth, the teacher's label, the proposals,
the refined label, the student's prediction).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Annotated

import typer

from semires import annotations
from semires import report as rep
from semires.atomic import atomic_path
from semires.errors import SemiresError
from semires.inference import STUDENT, TEACHER, load_networks
from semires.semi import UnlabeledDataset
from stages.burn_in import read_labeled
from stages.common import DEFAULT_PARAMS, AnnsOption, ParamsOption, log, stage_command
from stages.params import DatasetParams, check, section
from stages.split import SplitParams
from stages.train_semi import SemiParams, parse_method


def _parse_run(run: str) -> tuple[str, float] | None:
    """``cpi_pwa/5`` -> ("cpi_pwa", 5.0); None unless a teacher-student method and a percent."""
    method, _, fraction = run.partition("/")
    try:
        f = float(fraction)
        parsed = parse_method(method)
    except ValueError:
        return None
    return (method, f) if parsed is not None and 0 < f < 100 else None


@dataclasses.dataclass(frozen=True)
class ReportParams:
    """report.*: what the pseudo-label figure shows, and the figures' resolution."""

    samples: int = 6  # unlabeled expressions (rows) in pseudo_labels.png
    # <method>/<percent> of train_semi; null: the first refining method at the lowest fraction
    run: str | None = None
    seed: int = 0  # which unlabeled expressions
    dpi: int = 100

    def __post_init__(self) -> None:
        check(1 <= self.samples <= 64, "report.samples", self.samples, "expected 1 to 64 samples")
        check(
            self.run is None or _parse_run(self.run) is not None,
            "report.run",
            self.run,
            "expected null or <method>/<percent> of a teacher-student run, e.g. cpi_pwa/5",
        )
        check(50 <= self.dpi <= 600, "report.dpi", self.dpi, "expected 50 to 600 dots per inch")


def _fraction_dirs(root: Path) -> list[tuple[float, Path]]:
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            out.append((float(d.name), d))
        except ValueError:
            continue
    return sorted(out, key=lambda t: t[0])


def find_runs(burn_in_root: Path, train_semi_root: Path) -> tuple[list[rep.Run], list[rep.Run]]:
    """The DVCLive curves of every burn-in and teacher-student run on disk."""
    burn_in = [
        rep.Run(rep.BURN_IN, f, rep.load_curves(d / "dvclive"))
        for f, d in _fraction_dirs(burn_in_root)
        if (d / "dvclive").is_dir()
    ]
    folders = [d for d in train_semi_root.iterdir() if d.is_dir()] if train_semi_root.is_dir() else []
    semi = []
    for m in folders:
        if m.name != rep.CONTROL:
            try:
                parse_method(m.name)
            except ValueError:
                continue
        semi += [
            rep.Run(m.name, f, rep.load_curves(d / "dvclive"))
            for f, d in _fraction_dirs(m)
            if (d / "dvclive").is_dir()
        ]
    semi.sort(
        key=lambda r: (r.fraction, rep.method_sort_key(r.method) if r.method != rep.CONTROL else (-1, ""))
    )
    return burn_in, semi


def pick_run(rp: ReportParams, sp: SemiParams, train_semi_root: Path) -> tuple[str, float, Path] | None:
    """The teacher-student run the pseudo-label figure shows: report.run, or the first method
    of semi.methods that refines with proposals (iom, cpi; else raw) at the lowest of
    semi.fractions that has a checkpoint."""
    if rp.run is not None:
        method, f = _parse_run(rp.run)  # type: ignore[misc]
        path = train_semi_root / method / rep.percent(f) / "model.pt"
        if not path.is_file():
            raise SemiresError(
                f"{path}: report.run = {rp.run!r} names a run that was not trained; add it to "
                "semi.methods / semi.fractions and `dvc repro`, or set report.run to null"
            )
        return method, f, path
    teacher_student = [m for m in sp.methods if parse_method(m) is not None]
    ranked = sorted(teacher_student, key=lambda m: parse_method(m)[0] == "none")  # type: ignore[index]
    for f in sorted(sp.fractions):
        for m in ranked:
            path = train_semi_root / m / rep.percent(f) / "model.pt"
            if path.is_file():
                return m, f, path
    return None


def pseudo_label_examples(
    checkpoint: Path,
    method: str,
    fraction: float,
    rp: ReportParams,
    sp: SemiParams,
    dp: DatasetParams,
    split_root: Path,
    anns_path: Path,
    proposals: Path,
) -> list[rep.PseudoLabelExample]:
    networks = load_networks(checkpoint)
    if TEACHER not in networks:
        raise SemiresError(
            f"{checkpoint}: not a teacher-student checkpoint (no teacher); rerun train_semi {method} "
            f"at {rep.percent(fraction)} %"
        )
    teacher, student = networks[TEACHER], networks[STUDENT]
    split_path = split_root / f"{rep.percent(fraction)}.json"
    _, labeled_ids = read_labeled(split_path)
    labeled = set(labeled_ids)
    anns = annotations.load(anns_path)
    unl = [r for r in anns.in_split("train") if r.image_id not in labeled and r.sentences]
    if not unl:
        raise SemiresError(f"{split_path}: no unlabeled train images; the pseudo-label figure needs some")
    spec = teacher.spec
    data = UnlabeledDataset(
        unl, dp.image_dir, teacher.tokenizer, proposals,
        image_size=spec.config.image_size, max_tokens=spec.config.max_tokens,
    )  # fmt: skip
    # One expression per image while there are images to spare, in a seeded order.
    order = list(range(len(data)))
    random.Random(rp.seed).shuffle(order)
    picks, images = [], set()
    for i in order:
        image = data.refs[data.pairs[i][0]].image_id
        if image not in images:
            picks.append(i)
            images.add(image)
        if len(picks) == rp.samples:
            break
    for i in order:
        if len(picks) >= rp.samples:
            break
        if i not in picks:
            picks.append(i)
    return rep.pseudo_label_examples(
        teacher.network, student.network, data, picks, sp.refine_config(method), device=teacher.device
    )


@stage_command("report")
def report(
    out: Annotated[
        Path, typer.Option(help="Folder for results.md/.csv, curves.png, pseudo_labels.png.")
    ] = Path("reports"),
    eval_root: Annotated[
        Path, typer.Option("--eval", help="Where `evaluate` writes <model>/<percent>/scores.json.")
    ] = Path("data/eval"),
    burn_in_root: Annotated[
        Path, typer.Option("--burn-in", help="Where `burn-in` writes <percent>/dvclive.")
    ] = Path("data/burn_in"),
    train_semi_root: Annotated[
        Path,
        typer.Option(
            "--train-semi", help="Where `train-semi` writes <method>/<percent>/{model.pt,dvclive,...}."
        ),
    ] = Path("data/train_semi"),
    split_root: Annotated[Path, typer.Option("--split", help="data/split of `split`.")] = Path("data/split"),
    anns_path: AnnsOption = Path("data/anns.json"),
    proposals: Annotated[Path, typer.Option(help="The proposals store of `propose`.")] = Path(
        "data/proposals.zarr"
    ),
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Table 1 on whatever was trained (markdown and CSV), training curves, pseudo-labels."""
    rp = section(params, "report", ReportParams)
    sp = section(params, "semi", SemiParams)
    split = section(params, "split", SplitParams)
    dp = section(params, "dataset", DatasetParams)
    start = time.perf_counter()
    results = rep.configured(
        rep.load_results(eval_root, train_semi_root), split.fractions, sp.methods, sp.fractions
    )
    burn_in, semi = find_runs(burn_in_root, train_semi_root)
    semi_cells = {(m, float(f)) for m in sp.methods for f in sp.fractions}
    burn_in = [r for r in burn_in if r.fraction in {float(f) for f in split.fractions}]
    semi = [r for r in semi if (r.method, r.fraction) in semi_cells]
    picked = pick_run(rp, sp, train_semi_root)
    examples = None
    if picked is not None:
        method, fraction, checkpoint = picked
        examples = pseudo_label_examples(
            checkpoint, method, fraction, rp, sp, dp, split_root, anns_path, proposals
        )
    with atomic_path(out, directory=True) as tmp:
        (tmp / "results.md").write_text(rep.results_markdown(results), encoding="utf-8")
        (tmp / "results.csv").write_text(rep.results_csv(results), encoding="utf-8")
        rep.curves_figure(burn_in, semi, tmp / "curves.png", dpi=rp.dpi)
        if picked is not None:
            title = f"pseudo-labels of {method} at {rep.percent(fraction)} % labels ({checkpoint})"
            rep.pseudo_labels_figure(examples, tmp / "pseudo_labels.png", title=title, dpi=rp.dpi)
    log(
        "report",
        f"{len(results.evals)} evaluated models, {len(results.quality)} pseudo-label records, "
        f"{len(burn_in) + len(semi)} runs' curves -> {out}/results.md, results.csv, curves.png",
    )
    if picked is None:
        log("report", "no teacher-student checkpoint in semi.methods x semi.fractions: no pseudo_labels.png")
    else:
        matched = sum(e.matched for e in examples)
        log(
            "report",
            f"{len(examples)} unlabeled samples of {method} at {rep.percent(fraction)} % ({matched} matched) "
            f"-> {out}/pseudo_labels.png in {time.perf_counter() - start:.1f} s",
        )
