"""scripts/gpu_check.py at CPU sizes: every section runs, its checks pass, the JSON holds its figures."""

import json

import pytest
import torch

from .conftest import script_module


@pytest.fixture(scope="module")
def gpu_check():
    with script_module("gpu_check") as module:
        yield module


def test_tiny_run_passes_its_checks_and_reports_every_section(gpu_check, tmp_path, capsys, monkeypatch):
    plain = gpu_check.public_style_step

    def fits_one_each(student, teacher, lab, unl, *args, **kwargs):  # as fp32 might on a GPU
        if lab.image.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return plain(student, teacher, lab, unl, *args, **kwargs)

    monkeypatch.setattr(gpu_check, "public_style_step", fits_one_each)
    out = tmp_path / "gpu.json"
    rc = gpu_check.main(["--tiny", "--device", "cpu", "--budget-s", "20", "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert rc == 0
    assert report["ok"]
    assert report["checks"] == {
        "refine_iom_identical": True,
        "refine_cpi_identical": True,
        "sam_fast_fp32_identical": True,
        "train_finite_loss": True,
        "train_eager_no_host_sync": True,
        "train_channels-last_no_host_sync": True,
        "train_channels-last_matches_eager": True,
        "train_regional_matches_eager": True,
    }

    refine = report["refine"]
    assert set(refine["strategies"]) == {"iom", "cpi"}
    for row in refine["strategies"].values():
        assert row["identical"] and row["no_host_sync"] is None  # the sync check is CUDA-only
        assert row["batched_ms"] > 0 and row["loop_ms"] > 0 and row["speedup"] > 0
        assert row["iters_batched"] >= 1 and row["iters_loop"] >= 1
    # the planted exact match and part make some samples match, the padded one may not
    assert 0 < refine["strategies"]["cpi"]["matched"] <= refine["batch"]

    sam = report["sam"]
    assert set(sam["rows"]) == {name for name, _, _ in gpu_check.SAM_ROWS} and sam["row_errors"] == {}
    for row in sam["rows"].values():
        assert row["images"] >= 1 and row["images_per_s"] > 0
        shares = row["shares"]
        assert shares["encoder"] > 0 and shares["decoder"] > 0 and shares["post"] >= 0
        assert sum(shares[k] for k in ("encoder", "decoder", "post")) == pytest.approx(1.0)
        assert row["top_ops"] and row["top_ops"][0]["ms"] > 0
    # calibrated thresholds keep masks, so the post-processing is part of the measurement
    assert 0 < sam["calibration"]["kept_on_first_image"] <= sam["calibration"]["candidates"]
    assert sam["rows"]["library-fp32"]["masks_per_image"] >= 1
    # each row runs as many images as its time allows: the images both ran keep the same masks
    fast, lib = sam["rows"]["fast-fp32"]["masks_found"], sam["rows"]["library-fp32"]["masks_found"]
    n = min(len(fast), len(lib))
    assert n >= 1 and fast[:n] == lib[:n]
    same = sam["agreement"]["fast-fp32 vs library-fp32"]
    assert same["all_identical"] and same["identical"] == same["masks"] >= 1 and same["mean_iou"] == 1.0
    assert 0 < sam["agreement"]["fast-bf16 vs library-fp32"]["mean_iou"] <= 1
    # --tiny compiles with torch.compile's eager backend (graph capture, no code generation):
    # the compiled networks compute what the plain ones do
    assert sam["agreement"]["fast-compiled-bf16 vs fast-bf16"]["all_identical"]
    assert sam["public"]["calls_per_image"] == 2.5  # alternately 2 and 3 referred objects
    assert sam["public"]["json_files"] == 5
    for key in ("speedup_fp32", "speedup_bf16", "speedup_compiled", "speedup_public"):
        assert sam[key] > 0

    train = report["train"]
    assert train["preset"] == "tiny" and train["labeled"] == 2 and train["unlabeled"] == 2
    assert train["ours"]["labeled"] == 2 and train["ours"]["oom_at"] == []
    assert train["flops_per_step"] > 0
    for key in ("ours", "public"):
        assert train[key]["steps"] >= 1 and train[key]["samples_per_s"] > 0
        assert train[key]["mfu"] is None  # no known peak on a CPU
    # out of memory at the full batch: measured again at half of it, the ratio per sample
    assert train["public"]["oom_at"] == [[2, 2]]
    assert (train["public"]["labeled"], train["public"]["unlabeled"]) == (1, 1)
    assert train["speedup"] == pytest.approx(
        train["ours"]["samples_per_s"] / train["public"]["samples_per_s"]
    )
    assert train["speedup"] > 0 and train["finite_loss"]

    # our step's variants: each timed, checked against eager's two losses, profiled
    variants = train["variants"]
    assert list(variants) == ["eager", "channels-last", "regional"] and train["ours"] == variants["eager"]
    assert train["compile_backend"] == "aot_eager"  # --tiny: traced and differentiated, no code generation
    for row in variants.values():
        assert row["samples_per_s"] > 0 and row["first_step_s"] > 0 and row["mfu"] is None
        assert len(row["check_losses"]) == 2 and row["check_losses"][0] != row["check_losses"][1]
        assert row["matches_eager"] and row["loss_rel_diff"] <= train["loss_rtol"] == 1e-4
        assert row["speedup_vs_eager"] > 0
        assert ("host_syncs_traced" in row) == (row["compile"] == "none")
        prof = row["profile"]
        assert prof["time"] == "cpu" and prof["total_ms"] > 0 and len(prof["top_ops"]) == 5
        assert {"teacher", "refine", "student", "loss", "backward", "optimizer", "ema"} <= set(prof["phases"])
        assert {"BERT", "Swin blocks", "PWAM+gates", "decoder"} <= set(prof["regions"])
    assert variants["eager"]["host_syncs_traced"] == variants["channels-last"]["host_syncs_traced"] == 0
    assert variants["eager"]["profile"]["regions"]["window attention"]["ms"] > 0
    assert "window attention" not in variants["regional"]["profile"]["regions"]  # inside compiled blocks
    assert (variants["regional"]["compile"], variants["regional"]["channels_last"]) == ("regional", True)
    assert train["fastest"] in variants and train["speedup_vs_eager"] >= 1.0

    table = printed.strip().splitlines()
    header = table.index("| check | ours | public-style | ratio | target | met? |")
    rows = table[header + 2 :]
    assert rows and all(line.startswith("| ") and line.count("|") == 7 for line in rows)
    assert any(line.startswith("| train step samples/s") for line in rows)
    assert any(line.startswith("| train step samples/s, regional (regional compile") for line in rows)
    assert any(
        line.startswith("| train step eager: host syncs per step (CUDA / traced) | - / 0 |") for line in rows
    )
    assert "train step profile, eager (cpu time" in printed and "| phase | backward |" in printed
    assert any(line.startswith("| SAM images/s bf16 (tiny") for line in rows)


def test_outputs_that_differ_from_the_loop_fail_the_run(gpu_check, tmp_path, monkeypatch):
    plain = gpu_check.loop_refine

    def off_by_one(prob, proposals, valid, cfg):
        labels, weights, matched = plain(prob, proposals, valid, cfg)
        labels = labels.clone()
        labels[0, 0, 0] = 1 - labels[0, 0, 0]
        return labels, weights, matched

    monkeypatch.setattr(gpu_check, "loop_refine", off_by_one)
    out = tmp_path / "gpu.json"
    rc = gpu_check.main(
        ["--tiny", "--device", "cpu", "--sections", "refine", "--budget-s", "5", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert rc == 1
    assert report["checks"] == {"refine_iom_identical": False, "refine_cpi_identical": False}
    assert not report["ok"]


def test_loop_reference_matches_refine_with_and_without_pwa(gpu_check):
    from semires.refine import RefineConfig, refine

    prob, props, valid = gpu_check.refine_inputs(4, 9, 24, torch.device("cpu"), seed=5)
    for strategy in ("iom", "cpi", "none"):
        for pwa in (True, False):
            cfg = RefineConfig(strategy=strategy, pwa=pwa)
            got = refine(prob, props, valid, cfg)
            labels, weights, matched = gpu_check.loop_refine(prob, props, valid, cfg)
            assert torch.equal(got.labels, labels) and torch.equal(got.matched, matched)
            assert torch.allclose(got.weights, weights, rtol=0, atol=1e-6)


def test_a_host_sync_in_the_step_fails_the_run(gpu_check, tmp_path, monkeypatch):
    import semires.semi

    plain = semires.semi.ema_update

    def reads_back(teacher, student, rate):
        plain(teacher, student, rate)
        if next(teacher.parameters()).sum() > 0:  # a Python `if` on a device value
            pass

    monkeypatch.setattr(semires.semi, "ema_update", reads_back)
    out = tmp_path / "gpu.json"
    rc = gpu_check.main(
        ["--tiny", "--device", "cpu", "--sections", "train", "--train-variants", "eager", "--budget-s", "5",
         "--out", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert rc == 1 and not report["ok"]
    assert report["checks"]["train_eager_no_host_sync"] is False
    row = report["train"]["variants"]["eager"]
    assert row["host_syncs_traced"] == 1
    assert row["host_syncs_where"][0].startswith("_local_scalar_dense at test_gpu_check.py:")


def test_unknown_train_variant_is_one_line(gpu_check, capsys):
    assert gpu_check.main(["--tiny", "--device", "cpu", "--train-variants", "eager,fast"]) == 2
    assert capsys.readouterr().out.strip() == (
        "gpu_check: --train-variants 'fast': expected some of eager, channels-last, regional, full"
    )
