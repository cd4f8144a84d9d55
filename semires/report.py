"""The results report: the paper's Table 1 on whatever was trained, the training curves, and
a figure of pseudo-labels before and after refinement.

Reading turns the stage outputs into plain data (:func:`load_results`, :func:`load_curves`);
the tables are text built from that data (:func:`results_markdown`, :func:`results_csv`);
the figures are drawn with matplotlib's Agg canvas (no pyplot, no global backend) at a size
fixed by the number of panels and ``dpi``. Missing cells of a partially trained matrix show
as :data:`MISSING`; a file that exists but cannot be read is a :class:`SemiresError` naming
it.

Names follow the evaluate stage: a model is ``burn_in/<percent>`` or
``train_semi/<method>/<percent>``; the train_semi method ``supervised`` is the fair control
(the burn-in model trained on for the same steps with labeled data only).
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semires.errors import SemiresError

CONTROL = "supervised"
BURN_IN = "burn_in"
TRAIN_SEMI = "train_semi"
PSEUDO = "pseudo_labels"
SCORES = "scores.json"  # the evaluate stage's full detail, per model folder
METHOD_ORDER = ("iom", "iom_pwa", "cpi", "cpi_pwa", "raw", "raw_pwa")
SPLIT_ORDER = ("val", "testA", "testB")
PHASES = ("start", "end")
FULL = 100.0
MISSING = "\u2013"  # an en dash: a cell with no value

# Figure geometry, in inches (pixels = inches x dpi).
CURVES_SIZE = (15.0, 4.5)
PANEL_SIZE = (2.0, 2.4)  # one cell of the pseudo-label figure: width, height (title included)
PSEUDO_COLUMNS = ("image", "ground truth", "teacher", "proposals", "refined", "student")

# (model, method, fraction): ("burn_in", "burn_in", 5.0), ("train_semi", "iom", 5.0)
Key = tuple[str, str, float]


# --- reading --------------------------------------------------------------------------------


def percent(f: float) -> str:
    """5.0 -> "5", 0.5 -> "0.5": the label fraction as the stages name files and models."""
    return f"{f:g}"


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SemiresError(f"{path}: not readable JSON ({e}); {fix}") from e


def parse_model(name: str) -> Key | None:
    """``burn_in/5`` -> ("burn_in", "burn_in", 5.0); ``train_semi/iom/5`` -> ("train_semi",
    "iom", 5.0); None for anything else."""
    parts = name.split("/")
    try:
        if len(parts) == 2 and parts[0] == BURN_IN:
            f = float(parts[1])
            return (BURN_IN, BURN_IN, f) if 0 < f <= 100 else None
        if len(parts) == 3 and parts[0] == TRAIN_SEMI and parts[1]:
            f = float(parts[2])
            return (TRAIN_SEMI, parts[1], f) if 0 < f < 100 else None
    except ValueError:
        return None
    return None


@dataclass
class Results:
    """Evaluation metrics and pseudo-label quality of every trained model found.

    ``evals``: (model, method, fraction) -> split -> metric -> value (percent, count): the
    model's teacher when it has one (what the method delivers), else its only network.
    ``students``: the same for the students of teacher-student runs.
    ``quality``: (method, fraction) -> phase (start, end) -> metric -> value.
    """

    evals: dict[Key, dict[str, dict[str, float]]] = field(default_factory=dict)
    quality: dict[tuple[str, float], dict[str, dict[str, float]]] = field(default_factory=dict)
    students: dict[Key, dict[str, dict[str, float]]] = field(default_factory=dict)

    def value(self, key: Key, split: str, metric: str, *, student: bool = False) -> float | None:
        v = (self.students if student else self.evals).get(key, {}).get(split, {}).get(metric)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def fractions(self) -> list[float]:
        """Label fractions below 100 that anything was trained at, ascending."""
        fs = {k[2] for k in self.evals if k[2] < FULL} | {k[1] for k in self.quality}
        return sorted(fs)

    def methods(self) -> list[str]:
        """Teacher-student methods found (not the control), in the paper's order, then others."""
        found = {k[1] for k in self.evals if k[0] == TRAIN_SEMI} | {k[0] for k in self.quality}
        found.discard(CONTROL)
        return sorted(found, key=method_sort_key)

    def splits(self) -> list[str]:
        found = {s for per in self.evals.values() for s in per}
        return sorted(found, key=split_sort_key)


def method_sort_key(m: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(m), m) if m in METHOD_ORDER else (len(METHOD_ORDER), m)


def split_sort_key(s: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(s), s) if s in SPLIT_ORDER else (len(SPLIT_ORDER), s)


def _scores(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(m, dict) and all(_number(x) for x in m.values()) for m in v.values()
    )


def load_eval_metrics(
    root: Path,
) -> tuple[dict[Key, dict[str, dict[str, float]]], dict[Key, dict[str, dict[str, float]]]]:
    """Every ``<root>/**/scores.json`` of the evaluate stage (at least one must exist):
    ``(evals, students)`` as :class:`Results` holds them."""
    files = sorted(root.rglob(SCORES)) if root.is_dir() else []
    if not files:
        raise SemiresError(
            f"{root}: no evaluation scores ({SCORES}) found; train and evaluate a model first "
            "(`dvc repro`, or `semires burn-in` then `semires evaluate`)"
        )
    fix = "rerun the evaluate stage that writes it (`dvc repro` recomputes a changed output)"
    evals: dict[Key, dict[str, dict[str, float]]] = {}
    students: dict[Key, dict[str, dict[str, float]]] = {}
    seen: dict[Key, Path] = {}
    for path in files:
        obj = read_json(path, fix)
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), str) or "networks" not in obj:
            raise SemiresError(
                f"{path}: not a scores file of `semires evaluate` (expected {{model, networks, ...}}); {fix}"
            )
        name, networks = obj["model"], obj["networks"]
        key = parse_model(name)
        if key is None:
            raise SemiresError(
                f"{path}: model {name!r} is neither burn_in/<percent> nor "
                f"train_semi/<method>/<percent>; {fix}"
            )
        if key in seen:
            raise SemiresError(f"{path}: model {name!r} is also in {seen[key]}; delete the stale one")
        ok = isinstance(networks, dict) and set(networks) in ({"teacher", "student"}, {"model"})
        if not ok or not all(map(_scores, networks.values())):
            raise SemiresError(
                f"{path}: {name}: expected networks {{teacher, student}} or {{model}}, each "
                f"{{split: {{metric: number}}}} (oIoU, mIoU, ...); {fix}"
            )
        seen[key] = path
        evals[key] = {sp: dict(m) for sp, m in networks.get("teacher", networks.get("model", {})).items()}
        if "student" in networks:
            students[key] = {sp: dict(m) for sp, m in networks["student"].items()}
    return evals, students


def read_quality(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """One ``pseudo_labels.json`` of train_semi: ``<method>/<percent> -> phase (start, end) ->
    metric -> value``; the control's has no phases."""
    fix = "rerun the train_semi stage that writes it (`dvc repro`)"
    obj = read_json(path, fix)
    if not isinstance(obj, dict):
        raise SemiresError(
            f"{path}: not a pseudo-label quality file (expected {{method/percent: ...}}); {fix}"
        )
    for name, phases in obj.items():
        ok = isinstance(phases, dict) and all(
            p in PHASES and isinstance(m, dict) and all(_number(v) for v in m.values())
            for p, m in phases.items()
        )
        if parse_model(f"{TRAIN_SEMI}/{name}") is None or not ok:
            raise SemiresError(
                f"{path}: {name!r}: expected {{<method>/<percent>: {{start: {{metric: number}}, "
                f"end: ...}}}}; {fix}"
            )
    return obj


def load_quality(root: Path) -> dict[tuple[str, float], dict[str, dict[str, float]]]:
    """Every ``<root>/<method>/<percent>/pseudo_labels.json`` of train_semi (none is fine);
    records without a phase (the control's) are left out."""
    out: dict[tuple[str, float], dict[str, dict[str, float]]] = {}
    for path in sorted(root.rglob("pseudo_labels.json")) if root.is_dir() else []:
        for name, phases in read_quality(path).items():
            key = parse_model(f"{TRAIN_SEMI}/{name}")
            if phases and key is not None:  # the control writes {}: it has no pseudo-labels
                out[(key[1], key[2])] = {p: dict(m) for p, m in phases.items()}
    return out


def load_results(eval_root: Path, train_semi_root: Path) -> Results:
    evals, students = load_eval_metrics(eval_root)
    return Results(evals=evals, quality=load_quality(train_semi_root), students=students)


def configured(
    r: Results, burn_in: Sequence[float], methods: Sequence[str], fractions: Sequence[float]
) -> Results:
    """Only the cells the params still ask for: DVC leaves the outputs of a fraction or method
    removed from params.yaml on disk, and a stale number must not reach the table."""
    semi = {(m, float(f)) for m in methods for f in fractions}
    keep_b = {float(f) for f in burn_in}

    def keep(k: Key) -> bool:
        return (k[0] == BURN_IN and k[2] in keep_b) or (k[0] == TRAIN_SEMI and (k[1], k[2]) in semi)

    return Results(
        evals={k: v for k, v in r.evals.items() if keep(k)},
        quality={k: v for k, v in r.quality.items() if k in semi},
        students={k: v for k, v in r.students.items() if keep(k)},
    )


# --- tables ---------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 2, *, sign: bool = False, suffix: str = "") -> str:
    if v is None or math.isnan(v):
        return MISSING
    return f"{v:+.{digits}f}{suffix}" if sign else f"{v:.{digits}f}{suffix}"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def gap_closed(model: float | None, burn_in: float | None, full: float | None) -> float | None:
    """Share (percent) of the burn-in -> fully supervised gap that ``model`` closes:
    ``100 * (model - burn_in) / (full - burn_in)``; None without a gap (full <= burn-in)."""
    if model is None or burn_in is None or full is None or full <= burn_in:
        return None
    return 100.0 * (model - burn_in) / (full - burn_in)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def results_markdown(r: Results) -> str:
    """Table 1 per eval split (mIoU, oIoU, gain over the control, gap closed) and the
    pseudo-label quality table, as markdown."""
    fracs, methods, splits = r.fractions(), r.methods(), r.splits()
    has_control = any(k[0] == TRAIN_SEMI and k[1] == CONTROL for k in r.evals)
    models = ["burn-in", *(["control"] if has_control else []), *methods]
    with_students = {k[1] for k in r.students}
    columns = [c for m in models for c in ([m, f"{m} (student)"] if m in with_students else [m])]
    header = ["labeled", *columns, "100 % labels"]

    def key(name: str, f: float) -> Key:
        if name == "burn-in":
            return (BURN_IN, BURN_IN, f)
        return (TRAIN_SEMI, CONTROL if name == "control" else name, f)

    def cell(column: str, f: float, split: str, metric: str) -> float | None:
        name, student = column.removesuffix(" (student)"), column.endswith(" (student)")
        return r.value(key(name, f), split, metric, student=student)

    lines = [
        "# Results",
        "",
        "Referring expression segmentation on the eval splits (LAVT's protocol), per label fraction. "
        "burn-in: supervised on the labeled images only; control: the burn-in model trained on for "
        "the same steps with labeled data only (train_semi method `supervised`); "
        + (
            ", ".join(f"`{m}`" for m in methods)
            + ": teacher-student with that refinement (`_pwa`: with pixel-wise adjustment), "
            "its EMA teacher (the model the method delivers, as the official code evaluates it) "
            "with the student beside it; "
            if methods
            else ""
        )
        + "100 % labels: fully supervised (the same in every row). "
        f"{MISSING}: not trained or not evaluated.",
    ]
    for split in splits:
        full = {m: r.value((BURN_IN, BURN_IN, FULL), split, m) for m in ("mIoU", "oIoU")}
        for metric in ("mIoU", "oIoU"):
            rows = [
                [f"{percent(f)} %"] + [fmt(cell(c, f, split, metric)) for c in columns] + [fmt(full[metric])]
                for f in fracs
            ]
            lines += ["", f"## {split}: {metric} (%)", "", *_table(header, rows)]
        if has_control and methods:
            rows = [
                [f"{percent(f)} %"]
                + [
                    fmt(
                        _diff(r.value(key(m, f), split, "mIoU"), r.value(key("control", f), split, "mIoU")),
                        sign=True,
                    )
                    for m in methods
                ]
                for f in fracs
            ]
            lines += [
                "",
                f"## {split}: gain over the control (mIoU points)",
                "",
                *_table(["labeled", *methods], rows),
            ]
        if full["mIoU"] is not None and fracs:
            names = models[1:]
            rows = [
                [f"{percent(f)} %"]
                + [
                    fmt(
                        gap_closed(
                            r.value(key(n, f), split, "mIoU"),
                            r.value(key("burn-in", f), split, "mIoU"),
                            full["mIoU"],
                        ),
                        1,
                        suffix=" %",
                    )
                    for n in names
                ]
                for f in fracs
            ]
            if names:
                lines += [
                    "",
                    f"## {split}: share of the burn-in → 100 % gap closed (mIoU)",
                    "",
                    "(model - burn-in) / (100 % labels - burn-in) at the same label fraction.",
                    "",
                    *_table(["labeled", *names], rows),
                ]
    if r.quality:
        lines += [
            "",
            "## Pseudo-label quality",
            "",
            "The teacher's labels of unlabeled expressions against their hidden ground truth, at the "
            "start and the end of teacher-student training: mIoU (%) of its raw masks and after "
            "refinement; match rate: share a proposal matched; PWA share: share trained with "
            "pixel-wise weights (unmatched, PWA on).",
            "",
        ]
        header_q = [
            "method",
            "labeled",
            "start raw",
            "start refined",
            "end raw",
            "end refined",
            "match rate start",
            "match rate end",
            "PWA share start",
            "PWA share end",
        ]
        rows = []
        for (m, f), q in sorted(r.quality.items(), key=lambda kv: (kv[0][1], method_sort_key(kv[0][0]))):

            def g(phase: str, metric: str, q: Mapping[str, Mapping[str, float]] = q) -> float | None:
                v = q.get(phase, {}).get(metric)
                return None if v is None else float(v)

            rows.append(
                [f"`{m}`", f"{percent(f)} %"]
                + [fmt(g(p, f"{k}_mIoU")) for p in PHASES for k in ("raw", "refined")]
                + [fmt(g(p, "match_rate"), 1) for p in PHASES]
                + [fmt(g(p, "pwa_share"), 1) for p in PHASES]
            )
        lines += _table(header_q, rows)
    return "\n".join(lines) + "\n"


def results_csv(r: Results) -> str:
    """Long format, every value at full precision: ``model, method, fraction, network, split,
    metric, value``. Evaluation rows have model ``burn_in`` (method ``burn_in``) or
    ``train_semi``, network ``teacher`` / ``student`` (a teacher-student run) or ``model``;
    pseudo-label quality rows have model ``pseudo_labels``, network ``teacher`` (its labels)
    and the phase (``start``/``end``) as split. Sorted by model, method, fraction, network,
    split, metric."""
    rows: list[tuple[str, str, float, str, str, str, float]] = []
    for (model, method, f), per in r.evals.items():
        network = "teacher" if (model, method, f) in r.students else "model"
        for split, metrics in per.items():
            rows += [(model, method, f, network, split, k, v) for k, v in metrics.items()]
    for (model, method, f), per in r.students.items():
        for split, metrics in per.items():
            rows += [(model, method, f, "student", split, k, v) for k, v in metrics.items()]
    for (method, f), per in r.quality.items():
        for phase, metrics in per.items():
            rows += [(PSEUDO, method, f, "teacher", phase, k, v) for k, v in metrics.items()]
    rows.sort(
        key=lambda t: (
            t[0],
            method_sort_key(t[1]),
            t[2],
            t[3],
            PHASES.index(t[4]) if t[0] == PSEUDO else split_sort_key(t[4]),
            t[5],
        )
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "method", "fraction", "network", "split", "metric", "value"])
    for model, method, f, network, split, k, v in rows:
        w.writerow([model, method, percent(f), network, split, k, repr(v)])
    return buf.getvalue()


# --- training curves ------------------------------------------------------------------------

Series = tuple[np.ndarray, np.ndarray]  # steps, values


def read_tsv(path: Path) -> Series:
    """A DVCLive plot TSV (columns ``step`` and the metric; maybe ``timestamp``)."""
    fix = "rerun the training stage that writes it (`dvc repro`)"
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t"))
        head = rows[0]
        s = head.index("step")
        (v,) = [i for i, h in enumerate(head) if h not in ("step", "timestamp")]
        steps = np.array([int(float(row[s])) for row in rows[1:] if row], np.int64)
        values = np.array([float(row[v]) for row in rows[1:] if row], np.float64)
    except (OSError, UnicodeDecodeError, IndexError, ValueError) as e:
        raise SemiresError(f"{path}: not a DVCLive plot file (step, value columns; {e!r}); {fix}") from e
    return steps, values


def load_curves(live_dir: Path) -> dict[str, Series]:
    """``metric name -> (steps, values)`` from ``<live_dir>/plots/metrics/**.tsv``, e.g.
    ``train/loss``, ``val/mIoU``, ``pseudo/raw_mIoU``; empty when the folder is missing."""
    root = live_dir / "plots" / "metrics"
    if not root.is_dir():
        return {}
    return {p.relative_to(root).with_suffix("").as_posix(): read_tsv(p) for p in sorted(root.rglob("*.tsv"))}


@dataclass(frozen=True)
class Run:
    """One training run's curves: ``method`` is ``burn_in`` or a train_semi method."""

    method: str
    fraction: float
    curves: dict[str, Series]

    @property
    def label(self) -> str:
        name = "burn-in" if self.method == BURN_IN else ("control" if self.method == CONTROL else self.method)
        return f"{name} {percent(self.fraction)} %"


def _new_figure(size: tuple[float, float], dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=fig.dpi, metadata={"Software": None})


def curves_figure(burn_in: Sequence[Run], semi: Sequence[Run], path: Path, *, dpi: int = 100) -> None:
    """Three panels: train loss and val mIoU over burn-in then teacher-student steps (a
    teacher-student run starts where its fraction's burn-in ended), and the pseudo-labels'
    mIoU raw (dashed) vs refined (solid) over teacher-student steps."""
    fig = _new_figure(CURVES_SIZE, dpi)
    axes = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.9, bottom=0.12, wspace=0.22)
    cmap = _colours(len(burn_in) + len(semi))
    colours = {(run.method, run.fraction): cmap[i] for i, run in enumerate([*burn_in, *semi])}
    offsets = {}
    for run in burn_in:
        ends = [int(s[0][-1]) for s in run.curves.values() if len(s[0])]
        offsets[run.fraction] = max(ends, default=0)
    for ax, metric, title in ((axes[0], "train/loss", "train loss"), (axes[1], "val/mIoU", "val mIoU (%)")):
        drawn = False
        for run in [*burn_in, *semi]:
            series = run.curves.get(metric)
            if series is None or not len(series[0]):
                continue
            off = 0 if run.method == BURN_IN else offsets.get(run.fraction, 0)
            ax.plot(
                series[0] + off,
                series[1],
                color=colours[(run.method, run.fraction)],
                marker="o" if len(series[0]) < 8 else None,
                markersize=3,
                linewidth=1.2,
                label=run.label,
            )
            drawn = True
        for off in sorted({o for f, o in offsets.items() if o and any(r.fraction == f for r in semi)}):
            ax.axvline(off, color="0.8", linewidth=0.8, zorder=0)
        ax.set_title(title)
        ax.set_xlabel("step (teacher-student after burn-in)" if semi else "step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            _no_data(ax)
    ax = axes[2]
    drawn = False
    for run in semi:
        for kind, style in (("raw", "--"), ("refined", "-")):
            series = run.curves.get(f"pseudo/{kind}_mIoU")
            if series is None or not len(series[0]):
                continue
            ax.plot(
                series[0],
                series[1],
                linestyle=style,
                marker="o",
                markersize=3,
                color=colours[(run.method, run.fraction)],
                label=f"{run.label} {kind}",
            )
            drawn = True
    ax.set_title("pseudo-label mIoU (%): raw (dashed), refined (solid)")
    ax.set_xlabel("teacher-student step")
    if drawn:
        ax.legend(fontsize=7)
    else:
        _no_data(ax)
    _save(fig, path)


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")


# --- pseudo-labels --------------------------------------------------------------------------


@dataclass(frozen=True)
class PseudoLabelExample:
    """One unlabeled expression at the model's input size: what each step made of it."""

    image: np.ndarray  # H x W x 3 float in [0, 1], un-augmented
    sentence: str
    gt: np.ndarray  # H x W bool: the hidden truth
    teacher: np.ndarray  # H x W bool: the teacher's hard mask
    proposals: np.ndarray  # N x H x W bool
    refined: np.ndarray  # H x W bool: the pseudo-label after refinement
    weights: np.ndarray  # H x W float: per-pixel loss weights (PWA where unmatched)
    matched: bool
    pwa: bool
    strategy: str  # iom | cpi | none
    student: np.ndarray  # H x W bool: the student's prediction


def pseudo_label_examples(
    teacher, student, dataset, indices: Sequence[int], refine_cfg, *, device=None
) -> list[PseudoLabelExample]:
    """Run ``teacher`` and ``student`` (LAVT models) on the un-augmented expressions
    ``indices`` of ``dataset`` (a :class:`semires.semi.UnlabeledDataset` without transforms),
    refine the teacher's labels with the image's proposals as training does."""
    import torch

    from semires.bits import unpack_bits
    from semires.logits import forward
    from semires.refine import refine
    from semires.semi import collate_unlabeled, unlabeled_to_device

    device = torch.device("cpu") if device is None else device
    if not indices:
        return []
    batch = collate_unlabeled([dataset[i] for i in indices])
    b = unlabeled_to_device(batch, device)
    teacher.to(device).eval()
    student.to(device).eval()
    prob = forward(teacher, b.weak, b.input_ids, b.attention_mask).softmax(dim=1)[:, 1]
    pred = forward(student, b.weak, b.input_ids, b.attention_mask).argmax(dim=1).bool()
    r = refine(prob, b.proposals, b.valid, refine_cfg)
    out = []
    for k in range(len(indices)):
        n = int(batch.valid[k].sum())
        out.append(
            PseudoLabelExample(
                image=b.weak[k].permute(1, 2, 0).cpu().numpy(),
                sentence=batch.sentence[k],
                gt=batch.gt[k].bool().numpy(),
                teacher=r.raw[k].bool().cpu().numpy(),
                proposals=unpack_bits(b.proposals[k, :n].cpu(), batch.weak.shape[-1]).numpy(),
                refined=r.labels[k].bool().cpu().numpy(),
                weights=r.weights[k].cpu().numpy(),
                matched=bool(r.matched[k]),
                pwa=refine_cfg.pwa,
                strategy=refine_cfg.strategy,
                student=pred[k].cpu().numpy(),
            )
        )
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 100.0 * float(np.logical_and(a, b).sum()) / float(union) if union else 0.0


def overlay(image: np.ndarray, mask: np.ndarray, colour=(1.0, 0.15, 0.1), alpha: float = 0.55) -> np.ndarray:
    """The image dimmed, ``mask`` painted over it in ``colour``."""
    out = image * 0.45
    out[mask] = image[mask] * (1 - alpha) + np.asarray(colour) * alpha
    return out.clip(0, 1)


def proposals_overlay(
    image: np.ndarray, proposals: np.ndarray, seed: int = 0, alpha: float = 0.6
) -> np.ndarray:
    """Every proposal in its own colour over the image; smaller proposals drawn on top."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.1, 1.0, size=(len(proposals), 3))
    paint = image.copy()
    for i in np.argsort(-proposals.reshape(len(proposals), -1).sum(1), kind="stable"):
        paint[proposals[i]] = colours[i]
    covered = proposals.any(0) if len(proposals) else np.zeros(image.shape[:2], bool)
    out = image.copy()
    out[covered] = image[covered] * (1 - alpha) + paint[covered] * alpha
    return out


def _show_mask(ax, image: np.ndarray, mask: np.ndarray, colour) -> None:
    """The mask over the image, outlined in white."""
    ax.imshow(overlay(image, mask, colour))
    if mask.any() and not mask.all():
        ax.contour(mask, levels=[0.5], colors="white", linewidths=0.6)


def _refined_title(e: PseudoLabelExample) -> str:
    if e.matched:
        return f"refined ({e.strategy.upper()} matched)\nIoU {mask_iou(e.refined, e.gt):.1f}"
    if e.pwa:
        return "PWA weights (unmatched)"
    if e.strategy == "none":
        return f"raw: teacher's label\nIoU {mask_iou(e.refined, e.gt):.1f}"
    return f"unmatched: teacher's label\nIoU {mask_iou(e.refined, e.gt):.1f}"


def pseudo_labels_figure(
    examples: Sequence[PseudoLabelExample], path: Path, *, title: str = "", dpi: int = 100
) -> None:
    """One row per example: the image (sentence as title), ground truth, the teacher's label,
    the proposals, the refined label (or, for a PWA-weighted sample, its weight map with the
    label's outline) and the student's prediction. Size: ``PANEL_SIZE`` per cell."""
    ncol, nrow = len(PSEUDO_COLUMNS), max(1, len(examples))
    fig = _new_figure((PANEL_SIZE[0] * ncol, PANEL_SIZE[1] * nrow), dpi)
    axes = np.asarray(fig.subplots(nrow, ncol, squeeze=False))
    # In inches: room above each row for its titles (up to three lines), more for the suptitle.
    height, gap, bottom = PANEL_SIZE[1] * nrow, 0.5, 0.05
    top = gap + (0.3 if title else 0.0)
    axis = (height - top - bottom - (nrow - 1) * gap) / nrow
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=bottom / height, top=1 - top / height, wspace=0.06, hspace=gap / axis
    )
    if title:
        fig.suptitle(title, fontsize=10)
    for ax in axes.flat:
        ax.set_axis_off()
    for row, e in enumerate(examples):
        ax = axes[row]
        ax[0].imshow(e.image)
        ax[0].set_title("\n".join(textwrap.wrap(e.sentence, 28)[:3]), fontsize=7)
        _show_mask(ax[1], e.image, e.gt, (0.1, 0.8, 0.2))
        ax[1].set_title("ground truth", fontsize=7)
        _show_mask(ax[2], e.image, e.teacher, (1.0, 0.15, 0.1))
        ax[2].set_title(f"teacher\nIoU {mask_iou(e.teacher, e.gt):.1f}", fontsize=7)
        ax[3].imshow(proposals_overlay(e.image, e.proposals))
        ax[3].set_title(f"proposals ({len(e.proposals)})", fontsize=7)
        if not e.matched and e.pwa:
            ax[4].imshow(e.weights, cmap="magma", vmin=0.0, vmax=max(1.0, float(e.weights.max())))
            if e.refined.any():
                ax[4].contour(e.refined, levels=[0.5], colors="cyan", linewidths=0.8)
        else:
            _show_mask(ax[4], e.image, e.refined, (0.15, 0.4, 1.0))
        ax[4].set_title(_refined_title(e), fontsize=7)
        _show_mask(ax[5], e.image, e.student, (1.0, 0.7, 0.0))
        ax[5].set_title(f"student\nIoU {mask_iou(e.student, e.gt):.1f}", fontsize=7)
    if not examples:
        axes[0, 0].text(0.0, 0.5, "no unlabeled expressions", transform=axes[0, 0].transAxes)
    _save(fig, path)
