"""Stage ``propose`` end to end on a small synthetic dataset: one process, two torchrun
processes (same bytes), kill and resume, bad images and checkpoints."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from semires import annotations
from semires.distributed import LAUNCHER_ENV
from semires.proposals.base import cap, read_image
from semires.proposals.offline import FelzenszwalbMultiscale
from semires.proposals.store import ProposalStore
from semires.refer import read_refer
from semires.synth import SynthOptions, write_dataset
from stages.cli import app

SHARD = 3


def _params(root: Path, image_dir: Path, **proposals) -> Path:
    doc = {
        "dataset": {
            "name": "synthref",
            "split_by": "unc",
            "refer_root": str(root),
            "image_dir": str(image_dir),
        },
        "proposals": {"shard_images": SHARD, **proposals},
    }
    path = root / f"params-{len(list(root.glob('params-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def proposals_project(tmp_path_factory) -> Path:
    """A synthetic dataset, its annotation file and a params file (offline backend)."""
    root = tmp_path_factory.mktemp("propose")
    write_dataset(root, SynthOptions(num_images=16, seed=5))
    anns = read_refer(root, "synthref", "unc")
    annotations.save(root / "anns.json", anns)
    annotations.save_images(root / "train_images.json", anns, "train")
    (root / "params.yaml").write_text(_params(root, root / "images/synthref").read_text())
    return root


def _args(root: Path, out: Path, scratch: Path, params: Path | None = None) -> list[str]:
    return [
        "propose",
        "--images",
        str(root / "train_images.json"),
        "--out",
        str(out),
        "--scratch",
        str(scratch),
        "--params",
        str(params or root / "params.yaml"),
    ]


def _run_inprocess(args: list[str], monkeypatch) -> tuple[int, str]:
    monkeypatch.delenv("SEMIRES_NPROC", raising=False)
    result = CliRunner().invoke(app, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _subprocess(args: list[str], nproc: int, **kw) -> subprocess.Popen:
    env = {**os.environ, "SEMIRES_NPROC": str(nproc), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "stages.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def proposals_reference(proposals_project, tmp_path_factory) -> tuple[Path, str]:
    """An unbroken one-process run: the store and its log."""
    out = tmp_path_factory.mktemp("ref") / "proposals.zarr"
    mp = pytest.MonkeyPatch()
    try:
        code, log = _run_inprocess(_args(proposals_project, out, out.parent / "scratch"), mp)
    finally:
        mp.undo()
    assert code == 0, log
    return out, log


def test_one_process_store_holds_what_the_backend_returned(proposals_project, proposals_reference):
    out, log = proposals_reference
    anns = annotations.load(proposals_project / "anns.json")
    train = anns.images("train")
    s = ProposalStore(out, expect=FelzenszwalbMultiscale().config())
    assert s.image_ids.tolist() == sorted(train)
    assert "not SAM" in s.attributes["description"]
    backend = FelzenszwalbMultiscale()
    for image_id, (name, _, _) in list(train.items())[:3]:
        p = cap(backend(read_image(proposals_project / "images/synthref" / name)[0]), 256)
        assert s.num_masks(image_id) == len(p)
        assert torch.equal(s.masks(image_id), torch.from_numpy(p.masks))
        np.testing.assert_array_equal(s.attrs(image_id), p.attrs())
        small = s.masks(image_id, size=(48, 48))
        assert small.shape == (len(p), 48, 48) and small.dtype == torch.bool
    # the summary line; scratch removed once the store is in place
    assert f"done: {len(train)} images ({len(train)} computed now, {len(train)} backend calls)" in log
    assert "masks/image" in log and "bytes/mask" in log
    assert not any((out.parent / "scratch").iterdir())


def test_killed_two_process_run_dies_whole_refuses_a_second_and_resumes_to_the_same_bytes(
    proposals_project, proposals_reference, tmp_path, monkeypatch
):
    """The real launcher with two processes (torchrun, gloo), its process group killed as a
    scheduler kills it: no process of the run survives (torchrun's workers live in sessions
    of their own), a second run meanwhile is refused, and the rerun, also with two
    processes, resumes and writes the bytes of an unbroken one-process run."""
    from .test_faults import kill_group, refused_while_running, survivors

    out, scratch = tmp_path / "proposals.zarr", tmp_path / "scratch"
    args = _args(proposals_project, out, scratch)
    proc = _subprocess(args, nproc=2, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(scratch.glob("*/images/*.npz")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no image done after 240 s"
        time.sleep(0.005)
    refused_while_running(args, scratch, "propose")
    tree = kill_group(proc)
    assert len(tree) >= 4, tree  # the launcher, torchrun, two workers
    assert not survivors(tree), f"still running: {survivors(tree, 0)}"
    done = len(list(scratch.glob("*/images/*.npz")))
    total = len(annotations.load(proposals_project / "anns.json").images("train"))
    assert 1 <= done < total and not out.exists()

    # the rerun's torchrun started as its launcher would start it (its launcher is not under test)
    env = {**os.environ, "OMP_NUM_THREADS": "1", LAUNCHER_ENV: str(os.getpid())}
    cmd = [
        sys.executable,
        "-m",
        "semires.distributed",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "stages.cli",
    ]
    rerun = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log
    assert "2 process(es)" in log and f"({total - done} computed now" in log  # the rest only
    assert _tree(out) == _tree(proposals_reference[0])


def test_killed_run_resumes_without_redoing_finished_images(proposals_project, proposals_reference, tmp_path):
    out, scratch = tmp_path / "proposals.zarr", tmp_path / "scratch"
    proc = _subprocess(_args(proposals_project, out, scratch), nproc=1)
    deadline = time.monotonic() + 120
    while not list(scratch.glob("*/images/*.npz")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(scratch.glob("*/images/*.npz")))
    total = len(annotations.load(proposals_project / "anns.json").images("train"))
    assert 1 <= done < total and not out.exists()

    proc = _subprocess(_args(proposals_project, out, scratch), nproc=1)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log
    assert f"resuming: {done} of rank 0's {total} images already done" in log
    assert f"({total - done} computed now, {total - done} backend calls)" in log
    assert _tree(out) == _tree(proposals_reference[0])


def test_unreadable_image_stops_with_its_name_and_keeps_finished_images(
    proposals_project, proposals_reference, tmp_path, monkeypatch
):
    images = tmp_path / "images"
    shutil.copytree(proposals_project / "images/synthref", images)
    train = annotations.load(proposals_project / "anns.json").images("train")
    last = train[max(train)][0]  # processed last
    good = (images / last).read_bytes()
    (images / last).write_bytes(good[: len(good) // 3])  # truncated JPEG
    params = _params(proposals_project, images)
    out, scratch = tmp_path / "proposals.zarr", tmp_path / "scratch"

    code, log = _run_inprocess(_args(proposals_project, out, scratch, params), monkeypatch)
    assert code == 2
    assert f"semires propose: error: {images / last}: not a readable image" in log
    assert len(list(scratch.glob("*/images/*.npz"))) == len(train) - 1
    assert not out.exists()

    (images / last).write_bytes(good)
    code, log = _run_inprocess(_args(proposals_project, out, scratch, params), monkeypatch)
    assert code == 0, log
    assert "(1 computed now, 1 backend calls)" in log
    assert _tree(out) == _tree(proposals_reference[0])


def test_missing_or_mismatched_checkpoint_is_one_message(proposals_project, tmp_path, monkeypatch):
    from semires.proposals.sam import build_tiny_sam

    images = proposals_project / "images/synthref"
    missing = _params(
        proposals_project, images, backend="sam", model_type="vit_b", checkpoint=str(tmp_path / "x.pth")
    )
    code, log = _run_inprocess(
        _args(proposals_project, tmp_path / "o.zarr", tmp_path / "s", missing), monkeypatch
    )
    assert code == 2
    assert (
        log.strip()
        .splitlines()[-1]
        .startswith(f"semires propose: error: {tmp_path / 'x.pth'}: SAM checkpoint not found")
    )

    torch.save(build_tiny_sam().state_dict(), tmp_path / "tiny.pth")
    wrong = _params(
        proposals_project, images, backend="sam", model_type="vit_l", checkpoint=str(tmp_path / "tiny.pth")
    )
    code, log = _run_inprocess(
        _args(proposals_project, tmp_path / "o.zarr", tmp_path / "s", wrong), monkeypatch
    )
    assert code == 2
    assert "tiny.pth: checkpoint does not match model type vit_l" in log
    assert not (tmp_path / "o.zarr").exists()


def test_sam_backend_through_the_stage(proposals_project, tmp_path, monkeypatch):
    """The tiny random SAM through the whole stage: the store records its checkpoint hash."""
    from semires.proposals.base import file_sha256
    from semires.proposals.sam import build_tiny_sam

    torch.manual_seed(1)
    torch.save(build_tiny_sam().state_dict(), tmp_path / "tiny.pth")
    params = _params(
        proposals_project,
        proposals_project / "images/synthref",
        backend="sam",
        model_type="tiny",
        checkpoint=str(tmp_path / "tiny.pth"),
        generator={"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    )
    out = tmp_path / "p.zarr"
    code, log = _run_inprocess(_args(proposals_project, out, tmp_path / "s", params), monkeypatch)
    assert code == 0, log
    s = ProposalStore(out)
    assert s.backend == "sam" and s.attributes["model_type"] == "tiny"
    assert s.checkpoint_sha256 == file_sha256(tmp_path / "tiny.pth")
    assert s.settings["points_per_side"] == 2 and s.settings["box_nms_thresh"] == 0.7
    assert all(s.num_masks(i) >= 1 for i in s.image_ids)
