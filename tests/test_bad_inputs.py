"""Bad input to every stage: exit status 2, one line on stderr that names the file or params
key at fault and what to do, no traceback, and the outputs of an earlier run left byte for
byte as they were. docs/errors.md lists every message.

Cases already covered elsewhere are not repeated here: split.fractions and split.files
(tests/test_cli.py), refs pickles read by the library (tests/test_refer.py), a corrupt image
and SAM checkpoints for propose (tests/test_proposals_stage.py), burn_in.lr, a missing split
file and a missing checkpoint (tests/test_train_stages.py).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semires import annotations
from semires.proposals import store
from semires.proposals.store import ImageResult, Layout, ProposalStore
from semires.refer import load_refs_pickle as read_refs

from .conftest import REPO
from .test_faults import (
    base_params,
    burn_in_args,
    invoke,
    make_project,
    must_succeed,
    propose_args,
    train_semi_args,
    write_params,
)


def evaluate_args(root: Path, out_dir: Path, params: Path, checkpoint: Path | None = None) -> list:
    return ["evaluate", "--checkpoint", checkpoint or root / "burn_in" / "50" / "model.pt",
            "--name", "burn_in/50", "--anns", root / "anns.json", "--metrics", out_dir / "metrics.json",
            "--scores", out_dir / "scores.json", "--results", out_dir / "results.jsonl",
            "--params", params]  # fmt: skip


def extract_args(out_dir: Path, params: Path) -> list:
    return [
        "extract",
        "--out",
        out_dir / "anns.json",
        "--images",
        out_dir / "train_images.json",
        "--params",
        params,
    ]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The small project of test_faults, plus one finished output of every command under
    ``outputs/<command>/``: each case runs against a copy of them and must leave it as it was."""
    root = make_project(tmp_path_factory.mktemp("bad-inputs"))
    params, outputs = root / "params.yaml", root / "outputs"
    shutil.copytree(root / "burn_in" / "50", outputs / "burn-in")
    must_succeed(evaluate_args(root, outputs / "evaluate", params))
    shutil.copytree(root / "proposals.zarr", outputs / "propose" / "proposals.zarr")
    must_succeed(train_semi_args(root, outputs / "train-semi", root / "scratch" / "train_semi", params))
    (outputs / "extract").mkdir()
    shutil.copy(root / "anns.json", outputs / "extract")
    shutil.copy(root / "train_images.json", outputs / "extract")
    return root


def tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


# --- what each case spoils --------------------------------------------------------------------


@dataclass
class Setup:
    """What a case hands the command: its arguments, and the file or key the message must name."""

    args: list
    names: list[str]  # the message names one of these


Spoil = Callable[[Path, Path], Setup]


def _files(root: Path, which: str) -> list[str]:
    anns = annotations.load(root / "anns.json")
    labeled = set(json.loads((root / "split" / "50.json").read_text())["labeled"])
    if which == "val":
        refs = anns.in_split("val")
    else:
        refs = [r for r in anns.in_split("train") if (r.image_id in labeled) == (which == "labeled")]
    return sorted({r.file_name for r in refs})


def _images(root: Path, tmp: Path, which: str, how: str) -> tuple[Path, list[str]]:
    """A copy of the image folder with the ``which`` images missing or truncated, its params."""
    images = tmp / "images"
    shutil.copytree(root / "refer" / "images" / "synthref", images)
    names = _files(root, which)
    for name in names:
        if how == "missing":
            (images / name).unlink()
        else:
            data = (images / name).read_bytes()
            (images / name).write_bytes(data[: len(data) // 3])
    params = write_params(tmp / "params.yaml", base_params(root), dataset__image_dir=str(images))
    return params, [str(images / n) for n in names]


def image_case(cmd: str, which: str, how: str) -> Spoil:
    def spoil(root: Path, tmp: Path) -> Setup:
        params, names = _images(root, tmp, which, how)
        return Setup(command(cmd, root, tmp, params), names)

    return spoil


def params_case(cmd: str, **change) -> Spoil:
    def spoil(root: Path, tmp: Path) -> Setup:
        params = write_params(tmp / "params.yaml", base_params(root), **change)
        (name,) = change
        sect, key = name.split("__")
        return Setup(command(cmd, root, tmp, params), [f"{sect}.{key}"])

    return spoil


def _checkpoint(root: Path, tmp: Path, how: str) -> Path:
    path = tmp / "model.pt"
    good = root / "burn_in" / "50" / "model.pt"
    if how == "wrong shape":  # a state dict that does not fit the model its spec describes
        obj = torch.load(good, weights_only=True)
        key = "decoder.classifier.weight"
        obj["model"][key] = torch.zeros(3, *obj["model"][key].shape[1:])
        torch.save(obj, path)
    elif how == "not a checkpoint":
        path.write_text("model weights go here\n")
    elif how == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "teacher-student":
        shutil.copy(root / "outputs" / "train-semi" / "model.pt", path)
    return path


def checkpoint_case(cmd: str, how: str) -> Spoil:
    def spoil(root: Path, tmp: Path) -> Setup:
        path = _checkpoint(root, tmp, how)
        key = "checkpoint" if cmd == "evaluate" else "burn_in"
        return Setup(command(cmd, root, tmp, **{key: path}), [str(path)])

    return spoil


def other_fraction(root: Path, tmp: Path) -> Setup:
    return Setup(
        command("train-semi", root, tmp, split=root / "split" / "25.json"), [str(root / "burn_in" / "50")]
    )


def empty_split(root: Path, tmp: Path) -> Setup:
    doc = json.loads((root / "split" / "50.json").read_text())
    doc["unlabeled"], doc["labeled"] = sorted(doc["unlabeled"] + doc["labeled"]), []
    path = tmp / "50.json"
    path.write_text(json.dumps(doc))
    return Setup(command("burn-in", root, tmp, split=path), [str(path)])


def damaged_store(how: str) -> Spoil:
    def spoil(root: Path, tmp: Path) -> Setup:
        path = tmp / "proposals.zarr"
        shutil.copytree(root / "proposals.zarr", path)
        shard, meta = path / "masks" / "c" / "0" / "0", path / "zarr.json"
        if how == "missing":
            shutil.rmtree(path)
        elif how == "shard file deleted":
            shard.unlink()
        elif how == "shard file cut short":
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        else:
            meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
        return Setup(command("train-semi", root, tmp, proposals=path), [str(path)])

    return spoil


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a hostile refs pickle would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_pickle(root: Path, tmp: Path) -> Setup:
    refer = tmp / "refer"
    shutil.copytree(root / "refer" / "synthref", refer / "synthref")
    refs = refer / "synthref" / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{"ref_id": 0, "sentences": _RunsCode(tmp / "pwned")}]))
    params = write_params(tmp / "params.yaml", base_params(root), dataset__refer_root=str(refer))
    return Setup(extract_args(tmp / "out", params), [str(refs)])


def instances_case(how: str) -> Spoil:
    """``extract`` on a copy of the REFER files whose instances.json (or an image) is spoiled
    where the first ref points."""

    def spoil(root: Path, tmp: Path) -> Setup:
        refer = tmp / "refer"
        shutil.copytree(root / "refer" / "synthref", refer / "synthref")
        images = tmp / "images"
        shutil.copytree(root / "refer" / "images" / "synthref", images)
        path = refer / "synthref" / "instances.json"
        inst = json.loads(path.read_text())
        ref = read_refs(refer / "synthref" / "refs(unc).p")[0]
        image = next(im for im in inst["images"] if im["id"] == ref["image_id"])
        ann = next(a for a in inst["annotations"] if a["id"] == ref["ann_id"])
        names = [str(path)]
        if how == "image of another size":
            Image.new("RGB", (image["width"] + 8, image["height"])).save(images / image["file_name"])
            names = [str(images / image["file_name"])]
        elif how == "image missing":
            (images / image["file_name"]).unlink()
            names = [str(images / image["file_name"])]
        elif how == "file_name with ..":
            image["file_name"] = "../" + image["file_name"]
        elif how == "duplicate image id":
            other = next(im for im in inst["images"] if im["id"] != image["id"])
            inst["images"].append({**other, "id": image["id"]})
        else:  # a NaN box
            ann["bbox"] = [ann["bbox"][0], float("nan"), *ann["bbox"][2:]]
            names = [f"annotation {ann['id']}"]
        path.write_text(json.dumps(inst))
        params = write_params(
            tmp / "params.yaml",
            base_params(root),
            dataset__refer_root=str(refer),
            dataset__image_dir=str(images),
        )
        return Setup(extract_args(tmp / "out", params), names)

    return spoil


def yaml_case(cmd: str, edit: Callable[[str], str], name: str) -> Spoil:
    """``cmd`` with the project's params file edited as text (e.g. a key written twice)."""

    def spoil(root: Path, tmp: Path) -> Setup:
        params = tmp / "params.yaml"
        params.write_text(edit(yaml.safe_dump(base_params(root))))
        return Setup(command(cmd, root, tmp, params), [name])

    return spoil


def doc_case(cmd: str, edit: Callable[[dict], object], name: str) -> Spoil:
    """``cmd`` with the project's params edited as a document (a section null, misspelled or
    gone, a value only YAML writes, such as .nan)."""

    def spoil(root: Path, tmp: Path) -> Setup:
        doc = base_params(root)
        edit(doc)
        params = tmp / "params.yaml"
        params.write_text(yaml.safe_dump(doc))
        return Setup(command(cmd, root, tmp, params), [name])

    return spoil


def command(cmd: str, root: Path, tmp: Path, params: Path | None = None, **inputs) -> list:
    """``cmd``'s arguments with its outputs in ``tmp/out`` and its scratch in ``tmp/scratch``."""
    out, scratch, params = tmp / "out", tmp / "scratch", params or root / "params.yaml"
    if cmd == "burn-in":
        return burn_in_args(root, out, scratch, params, **inputs)
    if cmd == "evaluate":
        return evaluate_args(root, out, params, **inputs)
    if cmd == "propose":
        return propose_args(root, out / "proposals.zarr", scratch, params)
    if cmd == "train-semi":
        return train_semi_args(root, out, scratch, params, **inputs)
    return extract_args(out, params)


@dataclass(frozen=True)
class Case:
    cmd: str
    spoil: Spoil
    says: str  # what the message says of the named file or key
    fix: str  # and the part that says what to do
    xfail: str | None = None


CASES = {
    # images
    "burn-in: labeled image missing": Case(
        "burn-in", image_case("burn-in", "labeled", "missing"), "image not found", "check dataset.image_dir"
    ),
    "burn-in: labeled image truncated": Case(
        "burn-in", image_case("burn-in", "labeled", "truncated"), "not a readable image", "replace the file"
    ),
    "evaluate: val image missing": Case(
        "evaluate", image_case("evaluate", "val", "missing"), "image not found", "check dataset.image_dir"
    ),
    "evaluate: val image truncated": Case(
        "evaluate", image_case("evaluate", "val", "truncated"), "not a readable image", "replace the file"
    ),
    "propose: train image missing": Case(
        "propose", image_case("propose", "unlabeled", "missing"), "image not found", "check dataset.image_dir"
    ),
    "train-semi: unlabeled image missing": Case(
        "train-semi",
        image_case("train-semi", "unlabeled", "missing"),
        "image not found",
        "check dataset.image_dir",
    ),
    "train-semi: unlabeled image truncated": Case(
        "train-semi",
        image_case("train-semi", "unlabeled", "truncated"),
        "not a readable image",
        "replace the file",
    ),
    # checkpoints
    "evaluate: state dict does not fit": Case(
        "evaluate", checkpoint_case("evaluate", "wrong shape"), "weights do not fit", "delete it and retrain"
    ),
    "evaluate: not a checkpoint": Case(
        "evaluate", checkpoint_case("evaluate", "not a checkpoint"), "not a readable checkpoint", "delete it"
    ),
    "evaluate: truncated checkpoint": Case(
        "evaluate", checkpoint_case("evaluate", "truncated"), "not a readable checkpoint", "delete it"
    ),
    "train-semi: burn-in state dict does not fit": Case(
        "train-semi",
        checkpoint_case("train-semi", "wrong shape"),
        "weights do not fit",
        "delete it and retrain",
    ),
    "train-semi: burn-in not a checkpoint": Case(
        "train-semi",
        checkpoint_case("train-semi", "not a checkpoint"),
        "not a readable checkpoint",
        "delete it",
    ),
    "train-semi: a teacher-student checkpoint as burn-in": Case(
        "train-semi",
        checkpoint_case("train-semi", "teacher-student"),
        "not a burn-in checkpoint",
        "pass data/burn_in/<fraction>/model.pt",
    ),
    "train-semi: split of another fraction than the burn-in": Case(
        "train-semi", other_fraction, "trained on 50% labels", "pass the burn-in of the same fraction"
    ),
    # splits
    "burn-in: empty labeled list": Case(
        "burn-in", empty_split, "labeled image list is empty", "rerun `semires split`"
    ),
    # params
    "train-semi: semi.lr 'fast'": Case(
        "train-semi", params_case("train-semi", semi__lr="fast"), "'fast'", "expected a number"
    ),
    "train-semi: semi.methods [bogus]": Case(
        "train-semi", params_case("train-semi", semi__methods=["bogus"]), "'bogus'", "expected one of iom"
    ),
    "train-semi: semi.fractions [100]": Case(
        "train-semi",
        params_case("train-semi", semi__fractions=[100]),
        "100.0",
        "expected a percent in (0, 100)",
    ),
    "burn-in: burn_in.steps 0": Case(
        "burn-in", params_case("burn-in", burn_in__steps=0), "= 0", "expected at least 1 step"
    ),
    "burn-in: burn_in.max_epochs 0": Case(
        "burn-in",
        params_case("burn-in", burn_in__max_epochs=0),
        "burn_in.max_epochs = 0",
        "expected null (burn_in.steps alone) or a positive number",
    ),
    # the proposals store
    "train-semi: store shard file deleted": Case(
        "train-semi",
        damaged_store("shard file deleted"),
        "damaged proposals store",
        "semires propose",
    ),
    "train-semi: store shard file cut short": Case(
        "train-semi",
        damaged_store("shard file cut short"),
        "damaged proposals store",
        "semires propose",
    ),
    "train-semi: no proposals store": Case(
        "train-semi",
        damaged_store("missing"),
        "no proposals store here",
        "run `semires propose`",
    ),
    "train-semi: store zarr.json truncated": Case(
        "train-semi",
        damaged_store("zarr.json truncated"),
        "damaged proposals store",
        "semires propose",
    ),
    # REFER files
    "extract: refs pickle that imports code": Case(
        "extract", hostile_pickle, "refused to read this pickle", "replace it with the original refs file"
    ),
    "extract: an image of another size than instances.json says": Case(
        "extract",
        instances_case("image of another size"),
        "the annotations say",
        "dataset.image_dir must hold the images the annotations were made from",
    ),
    "extract: an image missing": Case(
        "extract", instances_case("image missing"), "image not found", "check dataset.image_dir"
    ),
    "extract: file_name with ../": Case(
        "extract",
        instances_case("file_name with .."),
        "points outside dataset.image_dir",
        "fix this image entry",
    ),
    "extract: an image id written twice": Case(
        "extract", instances_case("duplicate image id"), "appears twice", "replace it with the original"
    ),
    "extract: a NaN box": Case(
        "extract", instances_case("NaN bbox"), "is not [x, y, width, height]", "fix or drop this annotation"
    ),
    # params: nothing silent
    "burn-in: burn_in.class_weights [.inf, 1]": Case(
        "burn-in",
        params_case("burn-in", burn_in__class_weights=[float("inf"), 1.0]),
        "= inf",
        "expected a finite number",
    ),
    "train-semi: semi.unsup_weight .inf": Case(
        "train-semi", params_case("train-semi", semi__unsup_weight=float("inf")), "= inf", "expected a finite"
    ),
    "train-semi: semi.refine.pwa_offset .nan": Case(
        "train-semi",
        doc_case("train-semi", lambda d: d["semi"].update(refine={"pwa_offset": float("nan")}), "pwa_offset"),
        "semi.refine.pwa_offset = nan",
        "expected a finite number",
    ),
    "burn-in: burn_in.steps 10**30": Case(
        "burn-in",
        params_case("burn-in", burn_in__steps=10**30),
        "= 1000000000000000000000000000000",
        "expected 1..100,000,000 steps",
    ),
    "burn-in: the burn_in section null": Case(
        "burn-in",
        doc_case("burn-in", lambda d: d.update(burn_in=None), "burn_in"),
        "the `burn_in` section is empty (null)",
        "`burn_in: {}` for the built-in defaults",
    ),
    "burn-in: the burn_in section misspelled": Case(
        "burn-in",
        doc_case("burn-in", lambda d: d.update(burnin=d.pop("burn_in")), "burn_in"),
        "no `burn_in` section (is `burnin` a misspelling of it?)",
        "add `burn_in:` with its keys",
    ),
    "propose: no proposals section": Case(
        "propose",
        doc_case("propose", lambda d: d.pop("proposals"), "proposals"),
        "no `proposals` section",
        "add `proposals:` with its keys",
    ),
    "train-semi: a key written twice": Case(
        "train-semi",
        yaml_case("train-semi", lambda t: t.replace("semi:\n", "semi:\n  steps: 3\n"), "semi.steps"),
        "is written twice",
        "keep one",
    ),
}


def _params(cases: dict[str, Case]) -> list:
    return [
        pytest.param(name, marks=pytest.mark.xfail(reason=c.xfail, strict=True) if c.xfail else ())
        for name, c in cases.items()
    ]


@pytest.mark.parametrize("name", _params(CASES))
def test_bad_input_is_one_line_exit_2_and_keeps_outputs(project, name, tmp_path):
    case = CASES[name]
    shutil.copytree(project / "outputs" / case.cmd, tmp_path / "out")
    before = tree(tmp_path / "out")
    setup = case.spoil(project, tmp_path)

    res = invoke(setup.args)
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{name}: {res.exception!r}"
    assert res.exit_code == 2, f"{name}: exit {res.exit_code}\n{res.output}"
    assert "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith(f"semires {case.cmd}: error: "), line
    assert any(n in line for n in setup.names), f"names none of {setup.names}: {line}"
    assert case.says in line and case.fix in line, line
    assert tree(tmp_path / "out") == before, "a failed stage must leave earlier outputs as they were"
    assert not (tmp_path / "pwned").exists(), "the pickle's code ran"


def test_real_command_line_prints_one_line_and_no_traceback(project, tmp_path):
    """The same through `python -m stages.cli` (not typer's runner): stderr is the one line."""
    shutil.copytree(project / "outputs" / "evaluate", tmp_path / "out")
    before = tree(tmp_path / "out")
    setup = checkpoint_case("evaluate", "wrong shape")(project, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "SEMIRES_NPROC"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", *map(str, setup.args)],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"semires evaluate: error: {setup.names[0]}: weights do not fit the model the checkpoint describes "
        "(wrong shape 1 (e.g. decoder.classifier.weight: [3, 32, 1, 1] in the file, [2, 32, 1, 1] "
        "in the model)); the file is damaged or was edited: delete it and retrain"
    ]
    assert proc.stdout == ""
    assert tree(tmp_path / "out") == before


def _store_without_proposals(src: Path, dest: Path, keep: set[int]) -> None:
    """A copy of the store ``src`` in which only the images in ``keep`` have proposals."""
    s = ProposalStore(src)
    sizes = {int(i): (int(h), int(w)) for i, h, w in zip(s.image_ids, s.heights, s.widths, strict=True)}
    layout = Layout.build(sizes, int(s.attributes["max_masks"]), int(s.attributes["shard_images"]))
    own = {"format", "version", "attr_fields", *layout.to_json()}
    store.create(dest, layout, {k: v for k, v in s.attributes.items() if k not in own})
    counts = []
    for k in range(layout.num_shards):
        items = []
        for j in layout.shard(k):
            i, h, w = layout.images[j]
            n = s.num_masks(i) if i in keep else 0
            packed = s.packed(i) if n else np.zeros(0, np.uint8)
            attrs = s.attrs(i) if n else np.zeros((0, 7), np.float32)
            items.append(ImageResult(packed, attrs, n, h, w, n, ""))
            counts.append(n)
        store.write_shard(dest, layout, k, items)
    store.finish(dest, np.array(counts))


def test_images_without_proposals_train_with_pwa_instead_of_failing(project, tmp_path):
    split = json.loads((project / "split" / "50.json").read_text())
    keep = set(split["labeled"]) | {split["unlabeled"][0]}  # every unlabeled image but one: none
    _store_without_proposals(project / "proposals.zarr", tmp_path / "proposals.zarr", keep)
    empty = [i for i in split["unlabeled"] if i not in keep]
    assert all(ProposalStore(tmp_path / "proposals.zarr").num_masks(i) == 0 for i in empty)
    params = write_params(
        tmp_path / "params.yaml", base_params(project), semi__steps=6, semi__quality_samples=32
    )
    out = tmp_path / "out"
    args = train_semi_args(project, out, tmp_path / "scratch", params, proposals=tmp_path / "proposals.zarr")
    res = invoke(args)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 0, res.output
    assert (out / "model.pt").is_file()
    quality = json.loads((out / "pseudo_labels.json").read_text())["cpi_pwa/50"]
    for when in ("start", "end"):  # images without proposals: unmatched, trained with PWA weights
        assert quality[when]["match_rate"] < 100 and quality[when]["pwa_share"] > 0, quality


# --- faults of the machine: a read-only output folder, a full disk ------------------------------

READ_ONLY = (
    "cannot write (Read-only file system); make the folder writable, or write somewhere else, and rerun"
)
NO_SPACE = "cannot write (No space left on device); free space on that disk (or raise the quota) and rerun"


def _user_namespaces() -> bool:
    """Whether this machine lets an unprivileged process mount in a namespace of its own."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


def _out_copy(project: Path, cmd: str, dest: Path) -> Path:
    shutil.copytree(project / "outputs" / cmd, dest)
    return dest


@pytest.mark.skipif(not _user_namespaces(), reason="needs `unshare -Urm` (user namespaces) to mount a tmpfs")
def test_full_disk_and_read_only_folder_are_one_line_naming_the_path(project, tmp_path):
    """Real faults: a read-only bind mount, a tmpfs full at the start and one that fills up
    mid-run. propose and burn-in check their folders before any work; a disk that fills
    later stops the run with one line naming the file; earlier outputs stay as they were."""
    params = project / "params.yaml"
    ro_propose = _out_copy(project, "propose", tmp_path / "ro-propose")
    ro_burn_in = _out_copy(project, "burn-in", tmp_path / "ro-burn-in")
    out_burn_in = _out_copy(project, "burn-in", tmp_path / "out-burn-in")
    out_propose = _out_copy(project, "propose", tmp_path / "out-propose")
    s = {k: tmp_path / f"scratch-{k}" for k in ("ro-propose", "ro-burn-in", "full", "fills", "fills-propose")}
    cases = [
        {
            "name": "propose: read-only output folder",
            "mounts": [{"kind": "ro", "path": str(ro_propose)}],
            "args": propose_args(project, ro_propose / "proposals.zarr", s["ro-propose"], params),
            "unchanged": [str(ro_propose)],
        },
        {
            "name": "burn-in: read-only output folder",
            "mounts": [{"kind": "ro", "path": str(ro_burn_in)}],
            "args": burn_in_args(project, ro_burn_in, s["ro-burn-in"], params),
            "unchanged": [str(ro_burn_in)],
        },
        {
            "name": "propose: disk full at the start",
            "mounts": [{"kind": "tmpfs", "path": str(s["full"]), "size": "64k", "fill": True}],
            "args": propose_args(project, out_propose / "proposals.zarr", s["full"], params),
            "unchanged": [str(out_propose)],
        },
        {
            "name": "burn-in: disk fills mid-run",
            "mounts": [{"kind": "tmpfs", "path": str(s["fills"]), "size": "64k"}],
            "args": burn_in_args(project, out_burn_in, s["fills"], params),
            "unchanged": [str(out_burn_in)],
        },
        {
            "name": "propose: disk fills mid-run",
            "mounts": [{"kind": "tmpfs", "path": str(s["fills-propose"]), "size": "16k"}],
            "args": propose_args(project, out_propose / "proposals.zarr", s["fills-propose"], params),
            "unchanged": [str(out_propose)],
        },
    ]
    for case in cases:
        case["args"] = [str(a) for a in case["args"]]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "SEMIRES_NPROC"}
    proc = subprocess.run(
        ["unshare", "-Urm", sys.executable, "-m", "tests.machine_faults", str(tmp_path / "cases.json")],
        cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "cases.results.json").read_text())
    for name, r in results.items():
        assert r["exception"] is None and r["exit_code"] == 2, (name, r)
        assert r["unchanged"], f"{name}: an earlier output was touched"
    lines = {name: r["stderr"].splitlines() for name, r in results.items()}
    assert lines["propose: read-only output folder"] == [f"semires propose: error: {ro_propose}: {READ_ONLY}"]
    assert lines["burn-in: read-only output folder"] == [f"semires burn-in: error: {ro_burn_in}: {READ_ONLY}"]
    assert lines["propose: disk full at the start"] == [f"semires propose: error: {s['full']}: {NO_SPACE}"]
    for name, stage, scratch in (
        ("burn-in: disk fills mid-run", "burn-in", s["fills"]),
        ("propose: disk fills mid-run", "propose", s["fills-propose"]),
    ):
        (line,) = lines[name]
        assert re.fullmatch(
            rf"semires {stage}: error: {re.escape(str(scratch))}/\S+: {re.escape(NO_SPACE)}", line
        ), (
            name,
            line,
        )
    for k in ("ro-propose", "ro-burn-in"):  # refused before any work
        assert not s[k].exists(), k


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes in a folder of mode 0555 (the namespace test covers it)"
)
@pytest.mark.parametrize("cmd", ["propose", "burn-in"])
def test_read_only_output_folder_is_refused_before_any_work(project, tmp_path, cmd):
    out = _out_copy(project, cmd, tmp_path / "out")
    before = tree(out)
    scratch = tmp_path / "scratch"
    args = (
        propose_args(project, out / "proposals.zarr", scratch, project / "params.yaml")
        if cmd == "propose"
        else burn_in_args(project, out, scratch, project / "params.yaml")
    )
    out.chmod(0o555)
    try:
        res = invoke(args)
    finally:
        out.chmod(0o755)
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines() == [
        f"semires {cmd}: error: {out}: cannot write (Permission denied); make the folder writable, or write "
        "somewhere else, and rerun"
    ]
    assert tree(out) == before and not scratch.exists()


def test_a_loss_that_becomes_nan_stops_the_stage_with_one_line_naming_the_step(
    project, tmp_path, monkeypatch
):
    """From the fifth image the stage trains on (after the checkpoint of step 2), images are NaN
    (a fault injected where a batch's pixels become the model's input): the run stops at the
    first non-finite step, saves nothing after it, keeps its last good scratch checkpoint and
    the earlier output."""
    import semires.train

    real, loads = semires.train.to_unit, []

    def to_unit(pixels):
        loads.extend(range(len(pixels)))
        out = real(pixels)
        return out.fill_(float("nan")) if len(loads) > 4 else out

    monkeypatch.setattr(semires.train, "to_unit", to_unit)
    shutil.copytree(project / "outputs" / "burn-in", tmp_path / "out")
    before = tree(tmp_path / "out")
    params = write_params(tmp_path / "params.yaml", base_params(project), burn_in__steps=8)
    res = invoke(burn_in_args(project, tmp_path / "out", tmp_path / "scratch", params))
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.splitlines()
    m = re.fullmatch(
        r"semires burn-in: error: the training loss became non-finite \(NaN or infinite\) at step (\d+); "
        r"the run stopped without saving a checkpoint after it, and the last good checkpoint "
        r"(?:(\S+) \(step (\d+)\) stays|none was saved yet): lower the learning rate or check the inputs, "
        r"then rerun",
        line,
    )
    assert m, line
    assert tree(tmp_path / "out") == before
    (checkpoint,) = (tmp_path / "scratch").glob("*/last.pt")
    assert m.group(2) == str(checkpoint)
    assert int(m.group(3)) == torch.load(checkpoint, weights_only=True)["step"] < int(m.group(1))


def test_outputs_follow_the_umask(project):
    """Teammates on a shared machine or DVC cache can read what a stage wrote: every file and
    folder of the stages' outputs (a proposals store, checkpoints, DVCLive folders, splits,
    annotations) has the modes the umask gives, not the 0600 / 0700 of a temporary file."""
    mask = os.umask(0o022)
    os.umask(mask)
    roots = [project / n for n in ("proposals.zarr", "burn_in", "split", "anns.json", "train_images.json")]
    roots += [project / "outputs" / n for n in ("train-semi", "evaluate")]
    wrong = []
    for root in roots:
        for p in [root, *root.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            if stat.S_IMODE(p.stat().st_mode) != want:
                wrong.append(f"{p.relative_to(project)}: {stat.S_IMODE(p.stat().st_mode):o}")
    assert not wrong, f"umask {mask:03o}: {wrong}"
