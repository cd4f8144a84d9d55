"""The report: Table 1 from metrics files, the CSV, bad inputs, and the figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from semires import annotations
from semires import report as rep
from semires.atomic import write_json
from semires.errors import SemiresError
from semires.model.build import prepare, preset
from semires.proposals.base import Proposals
from semires.proposals.store import ImageResult, Layout, create, finish, write_shard
from semires.refer import read_refer
from semires.split import random_split
from semires.synth import SynthOptions, write_dataset
from semires.train import save_checkpoint
from stages.cli import app
from stages.params import ParamError, from_dict
from stages.report import ReportParams

runner = CliRunner()
DASH = rep.MISSING


def _split(v: float) -> dict[str, float]:
    return {"oIoU": v + 1, "mIoU": v, "prec@0.5": v / 2, "count": 40}


def write_scores(
    root, name: str, val: float, test_a: float | None = None, student: float | None = None
) -> None:
    """The evaluate stage's scores.json; with ``student``, a teacher-student run whose student
    scores ``student`` points below its teacher."""

    def splits(shift: float) -> dict[str, dict[str, float]]:
        out = {"val": _split(val - shift)}
        if test_a is not None:
            out["testA"] = _split(test_a - shift)
        return out

    networks = {"model": splits(0)} if student is None else {"teacher": splits(0), "student": splits(student)}
    write_json(root / name / "scores.json", {"model": name, "step": 10, "networks": networks})


def write_quality(root, method: str, fraction: str, phases: dict) -> None:
    write_json(root / method / fraction / "pseudo_labels.json", {f"{method}/{fraction}": phases})


def _quality(raw: float, refined: float, match: float, pwa: float) -> dict[str, float]:
    return {
        "raw_mIoU": raw,
        "raw_oIoU": raw + 1,
        "refined_mIoU": refined,
        "refined_oIoU": refined + 1,
        "match_rate": match,
        "pwa_share": pwa,
    }


@pytest.fixture
def trained(tmp_path):
    """A partially trained matrix: cpi_pwa at 5 %, iom at 10 %, the control at 5 % only."""
    ev, semi = tmp_path / "eval", tmp_path / "train_semi"
    write_scores(ev, "burn_in/5", 20.0, 18.0)
    write_scores(ev, "burn_in/10", 30.0)
    write_scores(ev, "burn_in/100", 50.0, 48.0)
    write_scores(ev, "train_semi/supervised/5", 22.0)
    write_scores(ev, "train_semi/cpi_pwa/5", 25.5, 21.25, student=1.0)
    write_scores(ev, "train_semi/iom/10", 33.0, student=0.5)
    write_quality(
        semi, "cpi_pwa", "5", {"start": _quality(40, 45.5, 60, 40), "end": _quality(50, 55, 70, 30)}
    )
    write_quality(semi, "iom", "10", {"end": _quality(52, 51, 80, 0)})
    write_quality(semi, "supervised", "5", {})  # the control has no pseudo-labels
    return tmp_path


def test_table_cells_and_gap_share(trained):
    r = rep.load_results(trained / "eval", trained / "train_semi")
    assert r.fractions() == [5.0, 10.0] and r.methods() == ["iom", "cpi_pwa"]
    assert r.splits() == ["val", "testA"]
    md = rep.results_markdown(r).splitlines()

    def table(heading: str) -> list[str]:
        i = md.index(heading)
        start = next(j for j in range(i + 1, len(md)) if md[j].startswith("|"))
        end = next((j for j in range(start, len(md)) if not md[j].startswith("|")), len(md))
        return md[start:end]

    # Each method's teacher, its student beside it
    assert table("## val: mIoU (%)") == [
        "| labeled | burn-in | control | iom | iom (student) | cpi_pwa | cpi_pwa (student) | 100 % labels |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| 5 % | 20.00 | 22.00 | {DASH} | {DASH} | 25.50 | 24.50 | 50.00 |",
        f"| 10 % | 30.00 | {DASH} | 33.00 | 32.50 | {DASH} | {DASH} | 50.00 |",
    ]
    assert (
        table("## val: oIoU (%)")[2] == f"| 5 % | 21.00 | 23.00 | {DASH} | {DASH} | 26.50 | 25.50 | 51.00 |"
    )
    assert table("## val: gain over the control (mIoU points)") == [
        "| labeled | iom | cpi_pwa |",
        "| --- | ---: | ---: |",
        f"| 5 % | {DASH} | +3.50 |",
        f"| 10 % | {DASH} | {DASH} |",
    ]
    # (25.5 - 20) / (50 - 20) = 18.3 %; the control (22 - 20) / 30 = 6.7 %; iom at 10: 3 / 20 = 15 %
    assert table("## val: share of the burn-in → 100 % gap closed (mIoU)")[2:] == [
        f"| 5 % | 6.7 % | {DASH} | 18.3 % |",
        f"| 10 % | {DASH} | 15.0 % | {DASH} |",
    ]
    assert table("## testA: mIoU (%)")[2:] == [
        f"| 5 % | 18.00 | {DASH} | {DASH} | {DASH} | 21.25 | 20.25 | 48.00 |",
        f"| 10 % | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | 48.00 |",
    ]
    assert table("## Pseudo-label quality") == [
        "| method | labeled | start raw | start refined | end raw | end refined | match rate start "
        "| match rate end | PWA share start | PWA share end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| `cpi_pwa` | 5 % | 40.00 | 45.50 | 50.00 | 55.00 | 60.0 | 70.0 | 40.0 | 30.0 |",
        f"| `iom` | 10 % | {DASH} | {DASH} | 52.00 | 51.00 | {DASH} | 80.0 | {DASH} | 0.0 |",
    ]


def test_cells_the_params_no_longer_ask_for_are_left_out(trained):
    """DVC keeps the outputs of a fraction or method removed from params.yaml on disk."""
    r = rep.load_results(trained / "eval", trained / "train_semi")
    kept = rep.configured(r, burn_in=[5, 100], methods=["cpi_pwa", "supervised"], fractions=[5])
    assert sorted(kept.evals) == [
        ("burn_in", "burn_in", 5.0), ("burn_in", "burn_in", 100.0),
        ("train_semi", "cpi_pwa", 5.0), ("train_semi", "supervised", 5.0),
    ]  # fmt: skip
    assert sorted(kept.quality) == [("cpi_pwa", 5.0)]  # the control has no pseudo-labels
    assert sorted(kept.students) == [("train_semi", "cpi_pwa", 5.0)]
    assert "iom" not in rep.results_markdown(kept)


def test_gap_share_arithmetic():
    assert rep.gap_closed(25.0, 20.0, 40.0) == pytest.approx(25.0)
    assert rep.gap_closed(45.0, 20.0, 40.0) == pytest.approx(125.0)  # beyond the ceiling
    assert rep.gap_closed(15.0, 20.0, 40.0) == pytest.approx(-25.0)  # worse than burn-in
    assert rep.gap_closed(25.0, 20.0, 20.0) is None  # no gap to close
    assert rep.gap_closed(None, 20.0, 40.0) is None


def test_no_gap_table_without_the_fully_supervised_model(trained):
    (trained / "eval" / "burn_in" / "100" / "scores.json").unlink()
    md = rep.results_markdown(rep.load_results(trained / "eval", trained / "train_semi"))
    assert "gap closed" not in md
    assert f"| 5 % | 20.00 | 22.00 | {DASH} | {DASH} | 25.50 | 24.50 | {DASH} |" in md


def test_csv_is_long_sorted_and_full_precision(trained):
    write_scores(trained / "eval", "train_semi/raw/5", 1 / 3, student=1 / 3)
    text = rep.results_csv(rep.load_results(trained / "eval", trained / "train_semi"))
    rows = text.splitlines()
    assert rows[0] == "model,method,fraction,network,split,metric,value"
    assert rows[1:5] == [
        "burn_in,burn_in,5,model,val,count,40",
        "burn_in,burn_in,5,model,val,mIoU,20.0",
        "burn_in,burn_in,5,model,val,oIoU,21.0",
        "burn_in,burn_in,5,model,val,prec@0.5,10.0",
    ]
    assert "burn_in,burn_in,5,model,testA,mIoU,18.0" in rows
    assert "train_semi,raw,5,teacher,val,mIoU,0.3333333333333333" in rows
    assert "train_semi,raw,5,student,val,mIoU,0.0" in rows
    assert "train_semi,cpi_pwa,5,student,testA,mIoU,20.25" in rows
    assert "train_semi,supervised,5,model,val,mIoU,22.0" in rows
    assert "pseudo_labels,cpi_pwa,5,teacher,start,refined_mIoU,45.5" in rows
    assert "pseudo_labels,iom,10,teacher,end,match_rate,80" in rows
    # 10 evaluated splits x 4 metrics, 4 students' splits x 4, 3 quality phases x 6 metrics
    assert len(rows) == 1 + 10 * 4 + 4 * 4 + 3 * 6
    models = [r.split(",")[0] for r in rows[1:]]
    assert models == sorted(models)
    assert text == rep.results_csv(rep.load_results(trained / "eval", trained / "train_semi"))


def test_nothing_evaluated_is_one_clear_error(tmp_path):
    with pytest.raises(SemiresError, match=r"eval: no evaluation scores \(scores.json\) found.*dvc repro"):
        rep.load_results(tmp_path / "eval", tmp_path / "train_semi")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not readable JSON"),
        ('["burn_in/5"]', "not a scores file"),
        ('{"model": "train_semi/iom/10", "networks": {"teacher": {"val": {"mIoU": "high"}}, "student": {}}}',
         r"expected networks \{teacher, student\} or \{model\}"),
        ('{"model": "train_semi/iom/10", "networks": {"teacher": {"val": {"mIoU": 1}}}}',
         r"expected networks \{teacher, student\} or \{model\}"),
        ('{"model": "burn_in/5", "networks": {"model": {"val": {"mIoU": 1}}}}',
         "also in .*burn_in/5/scores.json; delete the stale one"),
        ('{"model": "ema/5", "networks": {"model": {"val": {"mIoU": 1}}}}', "neither burn_in/<percent>"),
    ],
)  # fmt: skip
def test_corrupt_scores_name_the_file(trained, text, message):
    path = trained / "eval" / "train_semi" / "iom" / "10" / "scores.json"
    path.write_text(text)
    with pytest.raises(SemiresError, match=message) as e:
        rep.load_results(trained / "eval", trained / "train_semi")
    assert str(e.value).startswith(f"{path}: ")


def test_corrupt_quality_and_curves_name_the_file(trained, tmp_path):
    path = trained / "train_semi" / "iom" / "10" / "pseudo_labels.json"
    path.write_text('{"iom/10": {"middle": {}}}')
    with pytest.raises(SemiresError, match="pseudo_labels.json: 'iom/10': expected"):
        rep.load_results(trained / "eval", trained / "train_semi")
    tsv = tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("step\tloss\n0\tnan\n20\tjunk\n")
    with pytest.raises(SemiresError, match=r"loss.tsv: not a DVCLive plot file"):
        rep.load_curves(tmp_path / "live")


def test_report_params_are_checked():
    assert from_dict(ReportParams, {"run": "cpi_pwa/5"}, "report").run == "cpi_pwa/5"
    for bad in ({"run": "supervised/5"}, {"run": "cpi_pwa"}, {"run": "cpi/100"}, {"samples": 0}):
        with pytest.raises(ParamError, match="report\\."):
            from_dict(ReportParams, bad, "report")


# --- figures ----------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _example(matched: bool, pwa: bool, strategy: str = "cpi") -> rep.PseudoLabelExample:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    gt = (yy - 16) ** 2 + (xx - 12) ** 2 < 64
    teacher = (yy - 15) ** 2 + (xx - 14) ** 2 < 50
    return rep.PseudoLabelExample(
        image=rng.random((32, 32, 3)),
        sentence="the small red circle left of the blue square, which is long enough to wrap",
        gt=gt,
        teacher=teacher,
        proposals=np.stack([gt, xx < 8, np.zeros_like(gt)]),
        refined=gt if matched else teacher,
        weights=np.ones((32, 32)) if matched or not pwa else rng.random((32, 32)) + 0.03,
        matched=matched,
        pwa=pwa,
        strategy=strategy,
        student=teacher,
    )


def test_pseudo_labels_figure_size(tmp_path):
    examples = [_example(True, True), _example(False, True), _example(False, False, "none")]
    rep.pseudo_labels_figure(examples, tmp_path / "p.png", title="cpi_pwa at 5 %", dpi=50)
    w, h = rep.PANEL_SIZE
    assert _png_size(tmp_path / "p.png") == (round(6 * w * 50), round(3 * h * 50))


def _write_live(live, metrics: dict[str, list[tuple[int, float]]]) -> None:
    for name, rows in metrics.items():
        path = live / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        leaf = name.rsplit("/", 1)[-1]
        path.write_text(f"step\t{leaf}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project with everything the report reads: data, split, proposals, a teacher-student
    checkpoint, metrics and DVCLive curves."""
    root = tmp_path_factory.mktemp("report")
    write_dataset(root / "refer", SynthOptions(num_images=16, seed=7))
    anns = read_refer(root / "refer", "synthref", "unc")
    annotations.save(root / "anns.json", anns)
    split = random_split(anns.image_ids("train"), 50, 0)
    write_json(root / "split" / "50.json", split.to_json(anns))
    # Proposals: each train image's object masks, and the whole image for every other image.
    by_image = anns.refs_by_image("train")
    props = {}
    for k, (image_id, refs) in enumerate(sorted(by_image.items())):
        masks = [r.decode_mask() for r in refs]
        if k % 2:
            masks.append(np.ones_like(masks[0]))
        props[image_id] = Proposals.from_masks(np.stack(masks))
    layout = Layout.build({i: p.masks.shape[1:] for i, p in props.items()}, max_masks=16, shard_images=8)
    store = root / "proposals.zarr"
    create(store, layout, {"backend": "test", "checkpoint_sha256": None, "settings": {}})
    results = {i: ImageResult.from_proposals(p, len(p), "sha") for i, p in props.items()}
    for k in range(layout.num_shards):
        write_shard(store, layout, k, [results[layout.images[j][0]] for j in layout.shard(k)])
    finish(store, np.array([results[i].num_masks for i, _, _ in layout.images]))
    # A teacher-student checkpoint: student and (perturbed) teacher of the tiny model.
    torch.manual_seed(0)
    corpus = [s for r in anns.in_split("train") for s in r.sentences]
    spec, student = prepare(preset("tiny", image_size=64), corpus=corpus)
    teacher = prepare(preset("tiny", image_size=64), corpus=corpus)[1]
    run = root / "train_semi" / "cpi_pwa" / "50"
    save_checkpoint(run / "model.pt", spec=spec, model=student, step=4, teacher=teacher, meta={"percent": 50})
    write_quality(root / "train_semi", "cpi_pwa", "50", {"start": _quality(10, 12, 50, 50)})
    _write_live(
        run / "dvclive",
        {
            "train/loss": [(2, 0.5), (4, 0.4)],
            "val/mIoU": [(4, 22.0)],
            "pseudo/raw_mIoU": [(0, 10), (4, 11)],
            "pseudo/refined_mIoU": [(0, 12), (4, 14)],
        },
    )
    _write_live(
        root / "train_semi" / "supervised" / "50" / "dvclive",
        {"train/loss": [(2, 0.45), (4, 0.35)], "val/mIoU": [(4, 21.0)]},
    )
    _write_live(
        root / "burn_in" / "50" / "dvclive",
        {"train/loss": [(s, 1 / s) for s in range(2, 21, 2)], "val/mIoU": [(10, 15.0), (20, 20.0)]},
    )
    write_scores(root / "eval", "burn_in/50", 20.0)
    write_scores(root / "eval", "train_semi/cpi_pwa/50", 22.0, student=0.5)
    write_scores(root / "eval", "train_semi/supervised/50", 21.0)
    params = {
        "dataset": {"image_dir": str(root / "refer" / "images" / "synthref")},
        "split": {"fractions": [50, 100]},
        "semi": {"fractions": [50], "methods": ["supervised", "cpi_pwa"]},
        "report": {"samples": 3, "dpi": 50},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def report_args(root, params: str = "params.yaml") -> list[str]:
    return [
        "report", "--out", str(root / "reports"), "--eval", str(root / "eval"),
        "--burn-in", str(root / "burn_in"), "--train-semi", str(root / "train_semi"),
        "--split", str(root / "split"), "--anns", str(root / "anns.json"),
        "--proposals", str(root / "proposals.zarr"), "--params", str(root / params),
    ]  # fmt: skip


def test_report_stage_writes_tables_and_figures(project):
    res = runner.invoke(app, report_args(project))
    assert res.exit_code == 0, res.output
    out = project / "reports"
    assert sorted(p.name for p in out.iterdir()) == [
        "curves.png",
        "pseudo_labels.png",
        "results.csv",
        "results.md",
    ]
    md = (out / "results.md").read_text()
    assert f"| 50 % | 20.00 | 21.00 | 22.00 | 21.50 | {DASH} |" in md
    assert "| `cpi_pwa` | 50 % | 10.00 | 12.00 |" in md
    assert _png_size(out / "curves.png") == (round(rep.CURVES_SIZE[0] * 50), round(rep.CURVES_SIZE[1] * 50))
    w, h = rep.PANEL_SIZE
    assert _png_size(out / "pseudo_labels.png") == (round(6 * w * 50), round(3 * h * 50))
    assert "3 unlabeled samples of cpi_pwa at 50 %" in res.output
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert runner.invoke(app, report_args(project)).exit_code == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # deterministic


def test_a_failed_report_keeps_the_previous_one(project):
    assert runner.invoke(app, report_args(project)).exit_code == 0
    before = (project / "reports" / "results.md").read_text()
    bad = project / "eval" / "burn_in" / "50" / "scores.json"
    good = bad.read_text()
    bad.write_text("{")
    try:
        res = runner.invoke(app, report_args(project))
    finally:
        bad.write_text(good)
    assert res.exit_code == 2
    assert f"semires report: error: {bad}: not readable JSON" in res.output
    assert (project / "reports" / "results.md").read_text() == before
    assert not [p for p in project.iterdir() if p.name.startswith(".reports.")]


def test_report_run_that_was_not_trained_is_one_clear_error(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["report"]["run"] = "iom/50"
    (project / "other.yaml").write_text(yaml.safe_dump(params))
    res = runner.invoke(app, report_args(project, "other.yaml"))
    assert res.exit_code == 2
    assert "iom/50/model.pt: report.run = 'iom/50' names a run that was not trained" in res.output


def test_control_only_has_no_pseudo_label_figure(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["semi"]["methods"] = ["supervised"]
    (project / "control.yaml").write_text(yaml.safe_dump(params))
    args = report_args(project, "control.yaml")
    args[args.index("--out") + 1] = str(tmp_path / "reports")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [
        "curves.png",
        "results.csv",
        "results.md",
    ]
    assert "no pseudo_labels.png" in res.output
