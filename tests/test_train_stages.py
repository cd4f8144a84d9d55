"""The burn-in and evaluate commands through typer's runner, on a small synthetic project."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from semires import annotations
from semires.atomic import write_json
from semires.model.build import prepare, preset
from semires.refer import read_refer
from semires.split import random_split
from semires.synth import SynthOptions, write_dataset
from semires.train import load_checkpoint, save_checkpoint
from stages.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    write_dataset(root / "refer", SynthOptions(num_images=16, seed=7))
    anns = read_refer(root / "refer", "synthref", "unc")
    annotations.save(root / "anns.json", anns)
    write_json(root / "split" / "50.json", random_split(anns.image_ids("train"), 50, 0).to_json(anns))
    params = {
        "dataset": {"image_dir": str(root / "refer" / "images" / "synthref")},
        "model": {"preset": "tiny", "image_size": 64},
        "burn_in": {
            "steps": 4,
            "batch_size": 2,
            "lr": 1e-3,
            "log_every": 2,
            "eval_every": 0,
            "checkpoint_every": 2,
        },
        "evaluate": {"batch_size": 8},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root, anns


def burn_in_args(root, params="params.yaml"):
    return [
        "burn-in", "--split", str(root / "split" / "50.json"), "--anns", str(root / "anns.json"),
        "--out", str(root / "burn_in" / "model.pt"), "--live", str(root / "burn_in" / "dvclive"),
        "--scratch", str(root / "scratch"), "--params", str(root / params), "--resume",
    ]  # fmt: skip


def evaluate_args(root, checkpoint):
    return [
        "evaluate", "--checkpoint", str(checkpoint), "--name", "burn_in/50",
        "--anns", str(root / "anns.json"),
        "--metrics", str(root / "eval" / "metrics.json"), "--scores", str(root / "eval" / "scores.json"),
        "--results", str(root / "eval" / "results.jsonl"),
        "--params", str(root / "params.yaml"),
    ]  # fmt: skip


def test_burn_in_then_evaluate(project):
    root, anns = project
    res = runner.invoke(app, burn_in_args(root))
    assert res.exit_code == 0, res.output
    assert (root / "burn_in" / "model.pt").is_file()
    live = json.loads((root / "burn_in" / "dvclive" / "metrics.json").read_text())
    assert live["step"] == 4 and {"loss", "lr"} <= set(live["train"]) and "mIoU" in live["val"]
    assert (root / "burn_in" / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    assert not any((root / "scratch").iterdir())  # a finished run leaves no scratch behind
    assert not (root / "burn_in" / "dvc.yaml").exists()

    res = runner.invoke(app, evaluate_args(root, root / "burn_in" / "model.pt"))
    assert res.exit_code == 0, res.output
    scores = json.loads((root / "eval" / "scores.json").read_text())
    splits = [s for s in anns.splits() if s != "train"]
    assert scores["model"] == "burn_in/50" and scores["step"] == 4
    assert list(scores["networks"]) == ["model"] and list(scores["networks"]["model"]) == splits
    val = scores["networks"]["model"]["val"]
    assert {"oIoU", "mIoU", "prec@0.5", "prec@0.9", "count"} <= set(val)
    # The headline `dvc metrics show` prints: val oIoU and mIoU, rounded
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics == {"val": {"oIoU": round(val["oIoU"], 2), "mIoU": round(val["mIoU"], 2)}}
    rows = [json.loads(line) for line in (root / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == sum(len(r.sentences) for r in anns.refs if r.split != "train")
    assert {"model", "network", "split", "ref_id", "sent_id", "sentence", "I", "U", "IoU"} <= set(rows[0])


def test_max_epochs_ends_a_small_label_set_early_with_the_lr_at_zero(project):
    root, anns = project
    split = json.loads((root / "split" / "50.json").read_text())
    labeled = set(split["labeled"])
    refs = sum(1 for r in anns.refs if r.split == "train" and r.image_id in labeled and r.sentences)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["burn_in"].update(steps=1000, max_epochs=0.5)  # half a pass over the refs, batches of 2
    (root / "epochs.yaml").write_text(yaml.safe_dump(params))
    res = runner.invoke(app, burn_in_args(root, "epochs.yaml"))
    assert res.exit_code == 0, res.output
    steps = -(-refs // 4)  # ceil(0.5 * refs / 2)
    assert f"{steps} steps (burn_in.max_epochs 0.5 caps 1000)" in res.output
    live = json.loads((root / "burn_in" / "dvclive" / "metrics.json").read_text())
    assert live["step"] == steps
    lrs = (root / "burn_in" / "dvclive" / "plots" / "metrics" / "train" / "lr.tsv").read_text().split()
    assert float(lrs[-1]) == 0.0  # the poly decay ends at the capped last step


def test_bad_params_value_names_the_key(project, tmp_path):
    root, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["burn_in"]["lr"] = 5
    (root / "bad.yaml").write_text(yaml.safe_dump(params))
    res = runner.invoke(app, burn_in_args(root, "bad.yaml"))
    assert res.exit_code == 2 and "burn_in.lr" in res.output


def test_missing_split_file_is_one_clear_line(project):
    root, _ = project
    args = burn_in_args(root)
    args[args.index("--split") + 1] = str(root / "split" / "7.json")
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "7.json: split file not found" in res.output


def test_evaluating_a_missing_checkpoint_is_one_clear_line(project):
    root, _ = project
    res = runner.invoke(app, evaluate_args(root, root / "none.pt"))
    assert res.exit_code == 2 and "none.pt: checkpoint not found" in res.output


def test_evaluate_scores_the_teacher_and_the_student_beside_it(project, tmp_path):
    """A teacher-student checkpoint: the headline is the EMA teacher's, the student's beside it,
    and the end-of-training pseudo-label mIoU from --quality."""
    root, anns = project
    corpus = [s for r in anns.refs for s in r.sentences]
    torch.manual_seed(0)
    spec, student = prepare(preset("tiny"), corpus=corpus)
    teacher = prepare(preset("tiny"), corpus=corpus)[1]
    save_checkpoint(tmp_path / "model.pt", spec=spec, model=student, step=6, teacher=teacher)
    quality = {
        "start": {"raw_mIoU": 10.0, "refined_mIoU": 12.0},
        "end": {"raw_mIoU": 20.123, "refined_mIoU": 25.5},
    }
    write_json(tmp_path / "pseudo_labels.json", {"cpi_pwa/50": quality})
    args = evaluate_args(root, tmp_path / "model.pt")
    args[args.index("--name") + 1] = "train_semi/cpi_pwa/50"
    res = runner.invoke(app, [*args, "--quality", str(tmp_path / "pseudo_labels.json")])
    assert res.exit_code == 0, res.output
    scores = json.loads((root / "eval" / "scores.json").read_text())
    assert list(scores["networks"]) == ["teacher", "student"]
    t, s = scores["networks"]["teacher"]["val"], scores["networks"]["student"]["val"]
    assert t != s  # two different networks were scored
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics == {
        "val": {
            "oIoU": round(t["oIoU"], 2), "mIoU": round(t["mIoU"], 2),
            "student_oIoU": round(s["oIoU"], 2), "student_mIoU": round(s["mIoU"], 2),
        },
        "pseudo": {"raw_mIoU": 20.12, "refined_mIoU": 25.5},
    }  # fmt: skip
    rows = [json.loads(line) for line in (root / "eval" / "results.jsonl").read_text().splitlines()]
    assert {r["network"] for r in rows} == {"teacher", "student"}
    # A quality file that is not one is named
    (tmp_path / "pseudo_labels.json").write_text('{"cpi_pwa/50": {"end": {"raw_mIoU": "high"}}}')
    res = runner.invoke(app, [*args, "--quality", str(tmp_path / "pseudo_labels.json")])
    assert res.exit_code == 2 and "pseudo_labels.json: not a pseudo-label quality file" in res.output


@pytest.mark.parametrize(
    ("command", "key", "value", "expected"),
    [
        ("burn-in", "burn_in.num_workers", -1, "burn_in.num_workers = -1: expected null (auto"),
        ("burn-in", "burn_in.image_cache_mb", -5, "burn_in.image_cache_mb = -5: expected megabytes"),
        ("evaluate", "evaluate.num_workers", "many", "evaluate.num_workers = 'many': expected an integer"),
        ("evaluate", "evaluate.image_cache_mb", 1.5, "evaluate.image_cache_mb = 1.5: expected an integer"),
    ],
)
def test_bad_loader_params_name_the_key(project, tmp_path, command, key, value, expected):
    root, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    section, name = key.split(".")
    params.setdefault(section, {})[name] = value
    (root / "bad.yaml").write_text(yaml.safe_dump(params))
    args = burn_in_args(root, "bad.yaml") if command == "burn-in" else evaluate_args(root, root / "x.pt")
    if command == "evaluate":
        args[args.index("--params") + 1] = str(root / "bad.yaml")
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and expected in " ".join(res.output.split()), res.output


def test_loader_knobs_leave_the_run_key_alone(project):
    """A killed run continues with other worker or cache settings: they change no batch."""
    from semires.model.build import prepare, preset
    from stages.burn_in import BurnInParams, run_key
    from stages.train_semi import SemiParams
    from stages.train_semi import run_key as semi_key

    root, _ = project
    spec, _ = prepare(preset("tiny"), corpus=["a b"])
    anns_path = root / "anns.json"
    a = run_key(spec, BurnInParams(num_workers=None, image_cache_mb=128), [1], anns_path)
    b = run_key(spec, BurnInParams(num_workers=3, image_cache_mb=0), [1], anns_path)
    assert a == b != run_key(spec, BurnInParams(lr=1e-3), [1], anns_path)
    ckpt = root / "anns.json"  # any file stands in for the burn-in checkpoint here
    keys = {
        semi_key("supervised", SemiParams(num_workers=w, image_cache_mb=c), [1], anns_path, ckpt, root)
        for w, c in ((None, 128), (2, 0))
    }
    assert len(keys) == 1


def test_burn_in_compiled_and_channels_last_writes_the_same_checkpoint_layout(project, tmp_path, monkeypatch):
    """burn_in.compile: regional and burn_in.channels_last: true (compiled with aot_eager here:
    inductor's code generation takes minutes on a small CPU)."""
    import semires.model.speed

    monkeypatch.setattr(semires.model.speed, "DEFAULT_BACKEND", "aot_eager")
    root, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["burn_in"].update(compile="regional", channels_last=True)
    (root / "fast.yaml").write_text(yaml.safe_dump(params))
    args = burn_in_args(root, "fast.yaml")
    args[args.index("--out") + 1] = str(tmp_path / "model.pt")
    args[args.index("--live") + 1] = str(tmp_path / "dvclive")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    from semires.model.build import build_from_spec

    fast = load_checkpoint(tmp_path / "model.pt")
    assert fast.step == 4 and list(fast.model) == list(build_from_spec(fast.spec).state_dict())
    assert "mIoU" in json.loads((tmp_path / "dvclive" / "metrics.json").read_text())["val"]


def test_speed_knobs_leave_the_run_key_alone(project):
    """A killed run continues compiled, or channels-last, or not: the same function."""
    from semires.model.build import prepare, preset
    from stages.burn_in import BurnInParams, run_key
    from stages.train_semi import SemiParams
    from stages.train_semi import run_key as semi_key

    root, _ = project
    spec, _ = prepare(preset("tiny"), corpus=["a b"])
    anns_path = root / "anns.json"
    keys = {run_key(spec, BurnInParams(compile=c, channels_last=cl), [1], anns_path)
            for c, cl in (("none", False), ("regional", True), ("full", False))}  # fmt: skip
    assert len(keys) == 1
    ckpt = anns_path  # any file stands in for the burn-in checkpoint here
    semi = {semi_key("supervised", SemiParams(compile=c, channels_last=cl), [1], anns_path, ckpt, root)
            for c, cl in (("none", False), ("full", True))}  # fmt: skip
    assert len(semi) == 1


@pytest.mark.parametrize("section_name", ["burn_in", "semi"])
def test_bad_compile_mode_names_the_key_and_the_choices(tmp_path, section_name):
    from semires.errors import SemiresError
    from stages.burn_in import BurnInParams
    from stages.params import section
    from stages.train_semi import SemiParams

    path = tmp_path / "params.yaml"
    path.write_text(f"{section_name}:\n  compile: fast\n")
    cls = BurnInParams if section_name == "burn_in" else SemiParams
    with pytest.raises(SemiresError) as e:
        section(path, section_name, cls)
    assert str(e.value) == (
        f"params.yaml: {section_name}.compile = 'fast': expected none (eager), regional (Swin, PWAM, BERT "
        "blocks and the decoder compiled one by one) or full (the whole model as one graph)"
    )


def test_bad_semi_loader_param_names_the_key(tmp_path):
    from semires.errors import SemiresError
    from stages.params import section
    from stages.train_semi import SemiParams

    path = tmp_path / "params.yaml"
    path.write_text("semi:\n  image_cache_mb: -5\n")
    with pytest.raises(SemiresError, match=r"semi\.image_cache_mb = -5: expected megabytes"):
        section(path, "semi", SemiParams)
