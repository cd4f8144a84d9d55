"""`semires import-checkpoint`: official LAVT / SemiRES checkpoints as semires checkpoints.

tests/data/lavt_official/ (its README): a checkpoint saved exactly as the official
``train.py`` saves ``model_best_<id>.pth`` (random weights at the paper's geometry: 480 px,
window 12; narrow widths), its BERT folder, and ``golden.pt``: inputs and the logits the
official model returned for them (eval mode, fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch.serialization import safe_globals
from typer.testing import CliRunner

from semires import annotations
from semires.atomic import write_json
from semires.model.swin import SwinConfig
from semires.refer import read_refer
from semires.split import random_split
from semires.synth import SynthOptions, write_dataset
from semires.train import load_model
from stages.cli import app

DATA = Path(__file__).parent / "data" / "lavt_official"
OFFICIAL, BERT, GOLDEN = DATA / "official_checkpoint.pth", DATA / "bert", DATA / "golden.pt"


def run(*args) -> object:
    """``semires <args>`` through typer's runner, in one thread (the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def import_args(src: Path, out: Path, *extra, bert: Path = BERT) -> list:
    return ["import-checkpoint", src, "--bert-dir", bert, "--out", out, *extra]


@pytest.fixture(scope="module")
def official() -> dict:
    with safe_globals([argparse.Namespace]):
        return torch.load(OFFICIAL, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "model.pt"
    res = run(*import_args(OFFICIAL, out))
    assert res.exit_code == 0, res.output
    assert "Swin embed 16, depths 2-2-2-2, heads 1-2-4-8, window 12" in res.output
    return out


def test_imported_checkpoint_reproduces_the_official_logits(imported):
    spec, model, ckpt = load_model(imported)
    cfg = spec.config
    assert cfg.swin == SwinConfig(16, (2, 2, 2, 2), (1, 2, 4, 8), 12, 0.3)  # from the weights' shapes
    assert (cfg.image_size, cfg.max_tokens, cfg.pwam_heads, cfg.truncation) == (480, 20, (1, 1, 1, 1), "lavt")
    assert (
        ckpt.meta["stage"] == "burn_in" and ckpt.meta["source"] == "official" and "percent" not in ckpt.meta
    )
    golden = torch.load(GOLDEN, weights_only=True)
    # The official model received (image / 255 - mean) / std; semires normalises [0, 1] images itself.
    with torch.no_grad():
        logits = model.eval()(golden["image"].float() / 255, golden["input_ids"], golden["attention_mask"])
    assert (logits - golden["logits"]).abs().max() < 1e-4


def test_the_sentence_cut_is_lavts(imported):
    """One golden sentence is 20 tokens without [SEP]; the imported tokenizer cuts the same way."""
    spec, _, _ = load_model(imported)
    tok = spec.make_tokenizer()
    ids, mask = tok.encode([" ".join(f"w{i}" for i in range(30))], 20)
    assert mask.sum() == 20 and ids[0, 0] == tok._tok.token_to_id("[CLS]")
    assert ids[0, 1:].tolist() == [tok._tok.token_to_id(f"w{i}") for i in range(19)]


def test_lavt_one_layout_keeps_bert_inside_the_model(official, imported, tmp_path):
    one = {k: v for k, v in official.items() if k != "bert_model"}
    one["model"] = {
        **official["model"],
        **{f"text_encoder.{k}": v for k, v in official["bert_model"].items()},
    }
    torch.save(one, tmp_path / "one.pth")
    res = run(*import_args(tmp_path / "one.pth", tmp_path / "one.pt"))
    assert res.exit_code == 0 and "lavt_one layout" in res.output, res.output
    a, b = load_model(imported)[1].state_dict(), load_model(tmp_path / "one.pt")[1].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _spoil(case: str, official: dict, tmp: Path) -> tuple[Path, Path, str]:
    """(checkpoint, BERT folder, what the message must say) for one bad input."""
    src, bert = tmp / "bad.pth", BERT
    if case == "checkpoint missing":
        return tmp / "nope.pth", bert, "nope.pth: official checkpoint not found; fix the path"
    if case == "not a checkpoint":
        src.write_bytes(b"this is not a checkpoint")
        return src, bert, "bad.pth: not a checkpoint (not a file written by torch.save, or truncated)"
    if case == "truncated checkpoint":
        src.write_bytes(OFFICIAL.read_bytes()[:100_000])
        return src, bert, "bad.pth: not a checkpoint"
    if case == "pickle asks for another global":
        torch.save({**official, "args": _RunsCode(tmp / "pwned")}, src)
        return (
            src,
            bert,
            f"bad.pth: refused to read this checkpoint: its pickle asks for {os.system.__module__}.system",
        )
    if case == "no bert_model":
        torch.save({k: v for k, v in official.items() if k != "bert_model"}, src)
        return src, bert, "bad.pth: no BERT weights: neither a 'bert_model' entry nor text_encoder.* keys"
    if case == "a state dict of another model":
        torch.save(
            {
                "model": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)},
                "bert_model": official["bert_model"],
            },
            src,
        )
        return src, bert, "bad.pth: weights of another architecture (no backbone.patch_embed.proj.weight)"
    if case == "a key LAVT does not have":
        model = {**official["model"], "classifier.aspp.0.weight": torch.zeros(8, 8)}
        torch.save({**official, "model": model}, src)
        return src, bert, "weights of another architecture (classifier.aspp.0.weight is not a weight of LAVT)"
    if case == "a weight of another shape":
        model = dict(official["model"])
        model["classifier.conv1_1.weight"] = torch.zeros(3, 64, 1, 1)
        torch.save({**official, "model": model}, src)
        return (
            src,
            bert,
            "weights of another architecture (classifier.conv1_1.weight is [3, 64, 1, 1], "
            "the model needs [2, 64, 1, 1]",
        )
    bert = tmp / "bert"
    shutil.copytree(BERT, bert)
    if case == "BERT of another hidden size":
        config = json.loads((bert / "config.json").read_text())
        (bert / "config.json").write_text(
            json.dumps({**config, "hidden_size": 512, "num_attention_heads": 8})
        )
        return OFFICIAL, bert, f"{bert}: BERT of hidden size 512, but the checkpoint's hidden size is 768"
    if case == "BERT of another vocabulary":
        vocab = (bert / "vocab.txt").read_text().splitlines()
        (bert / "vocab.txt").write_text("\n".join(vocab[:150]) + "\n")
        return (
            OFFICIAL,
            bert,
            f"{bert}: a vocabulary of 150 tokens (config.json vocab_size 200), "
            "but the checkpoint's BERT embeds 200",
        )
    if case == "BERT folder missing":
        return OFFICIAL, tmp / "nope", f"{tmp / 'nope'}: BERT folder not found"
    raise AssertionError(case)


BAD = [
    "checkpoint missing", "not a checkpoint", "truncated checkpoint", "pickle asks for another global",
    "no bert_model", "a state dict of another model", "a key LAVT does not have", "a weight of another shape",
    "BERT of another hidden size", "BERT of another vocabulary", "BERT folder missing",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line_and_writes_nothing(case, official, tmp_path):
    src, bert, says = _spoil(case, official, tmp_path)
    out = tmp_path / "out" / "model.pt"
    out.parent.mkdir()
    out.write_bytes(b"an earlier output")
    res = run(*import_args(src, out, bert=bert))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semires import-checkpoint: error: "), res.output
    assert says in lines[0], lines[0]
    assert out.read_bytes() == b"an earlier output" and os.listdir(out.parent) == ["model.pt"]
    assert not (tmp_path / "pwned").exists()  # nothing in the pickle ran


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (["--image-size", "500"], "--image-size 500: expected a multiple of 32 in [64, 2048]"),
        (["--percent", "0"], "--percent 0: expected a percentage in (0, 100]"),
        (["--pwam-heads", "1-2"], "--pwam-heads = '1-2': expected four positive head counts a-b-c-d"),
    ],
)
def test_bad_option_is_one_clear_line(option, says, tmp_path):
    res = run(*import_args(OFFICIAL, tmp_path / "model.pt", *option))
    assert res.exit_code == 2 and says in res.output, res.output
    assert not (tmp_path / "model.pt").exists()


def test_pwam_heads_come_from_the_files_args(official, tmp_path):
    args = argparse.Namespace(**{**vars(official["args"]), "mha": "1-2-2-4", "sup_percent": "25"})
    torch.save({**official, "args": args}, tmp_path / "mha.pth")
    res = run(*import_args(tmp_path / "mha.pth", tmp_path / "model.pt"))
    assert res.exit_code == 0, res.output
    spec, _, ckpt = load_model(tmp_path / "model.pt")
    assert spec.config.pwam_heads == (1, 2, 2, 4) and ckpt.meta["percent"] == 25.0


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A 16-image synthetic set: annotations, a 50 % split, the offline proposals, params.yaml."""
    root = tmp_path_factory.mktemp("project")
    write_dataset(root / "refer", SynthOptions(num_images=16, seed=7))
    anns = read_refer(root / "refer", "synthref", "unc")
    annotations.save(root / "anns.json", anns)
    annotations.save_images(root / "train_images.json", anns, "train")
    write_json(root / "split" / "50.json", random_split(anns.image_ids("train"), 50, 0).to_json(anns))
    params = {
        "dataset": {"image_dir": str(root / "refer" / "images" / "synthref")},
        "proposals": {"shard_images": 4},
        "semi": {
            "fractions": [50], "methods": ["cpi_pwa"], "steps": 2, "batch_size": 2, "unlabeled_batch_size": 2,
            "log_every": 1, "eval_every": 0, "checkpoint_every": 2, "quality_samples": 4,
        },
        "evaluate": {"batch_size": 8},
    }  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    res = run("propose", "--images", root / "train_images.json", "--out", root / "proposals.zarr",
              "--scratch", root / "scratch" / "propose", "--params", root / "params.yaml")  # fmt: skip
    assert res.exit_code == 0, res.output
    return root


def test_an_imported_supervised_model_is_evaluated_and_continued_by_train_semi(project, tmp_path):
    """The README's steps: import the official burn-in of a fraction, score it, train the student."""
    root, model = project, tmp_path / "official_50.pt"
    res = run(*import_args(OFFICIAL, model, "--image-size", "64", "--percent", "50"))
    assert res.exit_code == 0 and "label fraction 50%" in res.output, res.output
    res = run("evaluate", "--checkpoint", model, "--name", "official/50", "--anns", root / "anns.json",
              "--metrics", tmp_path / "metrics.json", "--scores", tmp_path / "scores.json",
              "--results", tmp_path / "results.jsonl", "--params", root / "params.yaml")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "mIoU" in json.loads((tmp_path / "metrics.json").read_text())["val"]
    assert "mIoU" in json.loads((tmp_path / "scores.json").read_text())["networks"]["model"]["val"]

    def train_semi(split: str) -> object:
        out = tmp_path / "semi" / split
        return run("train-semi", "--method", "cpi_pwa", "--split", root / "split" / split,
                   "--burn-in", model, "--proposals", root / "proposals.zarr", "--anns", root / "anns.json",
                   "--out", out / "model.pt", "--live", out / "dvclive",
                   "--quality", out / "pseudo_labels.json", "--scratch", tmp_path / "scratch",
                   "--params", root / "params.yaml")  # fmt: skip

    res = train_semi("50.json")
    assert res.exit_code == 0, res.output
    spec, _, ckpt = load_model(tmp_path / "semi" / "50.json" / "model.pt")
    assert ckpt.meta["stage"] == "train_semi" and ckpt.teacher is not None and spec.config.name == "official"
    # Another fraction's split is refused: the imported model says which fraction it was trained on.
    anns = annotations.load(root / "anns.json")
    write_json(root / "split" / "25.json", random_split(anns.image_ids("train"), 25, 0).to_json(anns))
    res = train_semi("25.json")
    assert res.exit_code == 2 and "trained on 50% labels, but" in res.output, res.output
