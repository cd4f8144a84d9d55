"""scripts/bench_scale.py: RefCOCO's counts, SAM-like masks, the memory monitor, a tiny run."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from semires.proposals.base import Proposals
from semires.refer import read_refer

from .conftest import script_module


@pytest.fixture(scope="module")
def bench():
    with script_module("bench_scale") as module:
        yield module


def test_the_plan_has_refcocos_counts_and_smaller_sizes_are_prefixes(bench):
    images = bench.plan(bench.REFCOCO)
    for name, want in bench.REFCOCO.splits.items():
        got = images[name]
        assert len(got) == want.images
        assert sum(i.refs for i in got) == want.refs
        assert sum(sum(i.sentences) for i in got) == want.sentences
        assert all(i.refs >= 1 and min(i.sentences) >= 1 and i.objects >= i.refs for i in got)
    assert sum(i.objects for v in images.values() for i in v) == bench.REFCOCO.annotations
    small = bench.subset(bench.REFCOCO, images, 2020)
    assert small["train"] == images["train"][:2020]
    assert (
        len(small["val"]) == round(1500 * 2020 / 16994) and small["val"] == images["val"][: len(small["val"])]
    )
    words = [len(bench.sentence(np.random.default_rng(k)).split()) for k in range(500)]
    assert 3.2 < np.mean(words) < 3.8 and max(words) <= 8


def test_the_refer_files_read_back_with_every_ref(bench, tmp_path):
    spec = bench.TINY
    images = bench.subset(spec, bench.plan(spec), 20)
    bench.write_refer(spec, images, tmp_path / "refer")
    anns = read_refer(tmp_path / "refer", "synthref", "unc")
    for name, imgs in images.items():
        refs = anns.in_split(name)
        assert len(refs) == sum(i.refs for i in imgs)
        assert sum(len(r.sentences) for r in refs) == sum(sum(i.sentences) for i in imgs)
    assert all(r.decode_mask().any() and r.height == spec.height for r in anns.refs)


def test_sam_like_masks_are_seeded_by_the_image_and_their_attributes_are_the_masks(bench):
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    backend = bench.SamLike((100, 200))
    p = backend(image)
    assert 100 <= len(p) <= 200 and p.masks.shape[1:] == (120, 160)
    same = Proposals.from_masks(p.masks)
    assert np.array_equal(p.area, same.area) and np.array_equal(p.bbox, same.bbox)
    share = p.area / (120 * 160)
    assert share.min() > 0 and share.max() < 0.6 and np.median(share) < 0.05  # many parts, few large
    assert np.all((p.predicted_iou >= 0.88) & (p.stability_score >= 0.95))
    assert np.array_equal(backend(image).masks, p.masks)
    assert not np.array_equal(backend(image[:, ::-1].copy()).masks[0], p.masks[0])
    assert backend.config()["backend"] == "sam-like" and "not SAM" in backend.config()["description"]


def test_the_monitor_adds_up_a_process_and_its_children(bench, tmp_path):
    child = "import time; b = bytearray(150 << 20); time.sleep(3)"
    code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "a = bytearray(100 << 20); time.sleep(3); child.wait()\n"
    )
    m = bench.run_measured([sys.executable, "-c", code], {}, log_path=tmp_path / "log")
    assert m.rc == 0 and m.processes == 2
    assert m.peak_rss > 250 << 20 and m.peak_pss > 200 << 20 and m.own_peaks >= m.peak_rss


@pytest.mark.e2e
def test_a_tiny_run_measures_every_step_and_a_rerun_measures_nothing_again(bench, tmp_path, capsys):
    root = tmp_path / "scale"
    assert bench.main(["--root", str(root), "--tiny", "--sizes", "20"]) == 0
    out = capsys.readouterr().out
    results = json.loads((root / "results-after.json").read_text())
    row = results["n20"]
    assert row["counts"]["train"]["images"] == 20 and row["split"]["counts"]["unlabeled"]["images"] == 19
    assert row["extract"]["peak_rss"] > 0 and row["split"]["peak_rss"] > 0
    assert set(row["loader"]) == {"0", "1"} and min(row["loader"].values()) > 0
    assert row["train_semi"]["processes"] >= 2  # the main process and its loader worker
    assert row["train_semi"]["peak_pss"] <= row["train_semi"]["peak_rss"]
    assert row["evaluate"]["expressions"] == row["counts"]["val"]["sentences"]
    assert results["propose"]["store_files"] > 0 and results["propose"]["scratch_files"] >= 0
    assert results["refine"]["packed"] and results["refine"]["cpi"]["extra_mb"] >= 0
    assert "| 20 | 19 |" in out and "propose, 20 images" in out
    # everything is kept in --root: a rerun measures nothing again and prints the same table
    start = time.perf_counter()
    assert bench.main(["--root", str(root), "--tiny", "--sizes", "20"]) == 0
    assert json.loads((root / "results-after.json").read_text()) == results
    assert time.perf_counter() - start < 30
    assert capsys.readouterr().out.splitlines()[-6:] == out.splitlines()[-6:]
    # --only measures the steps named (and what they need), nothing else
    only_loader = ["--root", str(root), "--tiny", "--sizes", "20", "--only", "loader", "--label", "x"]
    assert bench.main(only_loader) == 0
    only = json.loads((root / "results-x.json").read_text())
    assert set(only["n20"]) == {"counts", "extract", "split", "loader"} and "refine" not in only
