"""Proposal backends: the offline one on synthetic images, the real SAM code path with a tiny
random SAM, checkpoint errors, and SAM 2 when it is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from semires.errors import SemiresError
from semires.proposals.base import Proposals, mask_boxes, read_image
from semires.proposals.offline import FelzenszwalbMultiscale
from semires.proposals.sam import SamBackend, SamSettings, build_tiny_sam
from semires.proposals.store import ProposalStore
from semires.refer import read_refer
from semires.synth import SynthOptions, write_dataset


@pytest.fixture(scope="module")
def proposals_synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthOptions(num_images=16, seed=3))
    return root


def _check_consistent(p: Proposals, h: int, w: int) -> None:
    n = len(p)
    assert p.masks.shape == (n, h, w) and p.masks.dtype == bool
    for a in (p.predicted_iou, p.stability_score, p.area):
        assert a.shape == (n,) and a.dtype == np.float32
    assert p.bbox.shape == (n, 4)
    np.testing.assert_array_equal(p.area, p.masks.sum(axis=(1, 2)))
    np.testing.assert_array_equal(p.bbox, mask_boxes(p.masks))


def test_offline_backend_finds_the_synthetic_objects(proposals_synth):
    """Every train ref's ground-truth mask is matched well by some proposal (mean best IoU)."""
    anns = read_refer(proposals_synth, "synthref", "unc")
    backend = FelzenszwalbMultiscale()
    cache: dict[int, Proposals] = {}
    best = []
    for r in anns.in_split("train"):
        if r.image_id not in cache:
            image, _ = read_image(proposals_synth / "images/synthref" / r.file_name)
            cache[r.image_id] = backend(image)
            _check_consistent(cache[r.image_id], r.height, r.width)
        m, g = cache[r.image_id].masks, r.decode_mask()
        best.append(((m & g).sum((1, 2)) / np.maximum((m | g).sum((1, 2)), 1)).max())
    assert backend.calls == len(cache)  # one call per image
    assert np.mean(best) > 0.85, np.mean(best)
    p = next(iter(cache.values()))
    assert np.isnan(p.predicted_iou).all()  # no learned quality estimate, and it says so
    assert ((p.stability_score > 0) & (p.stability_score <= 1)).all()
    assert "not SAM" in backend.config()["description"]


@pytest.fixture(scope="module")
def proposals_tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth"
    torch.save(build_tiny_sam().state_dict(), path)
    return path


LOOSE = SamSettings(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.99)


def test_sam_backend_runs_the_real_automatic_mask_generator(proposals_synth, proposals_tiny_ckpt):
    image, _ = read_image(next((proposals_synth / "images/synthref").glob("*train*")))
    backend = SamBackend("tiny", proposals_tiny_ckpt, LOOSE)
    p = backend(image)
    assert backend.calls == 1
    assert len(p) >= 1
    _check_consistent(p, *image.shape[:2])
    assert np.isfinite(p.predicted_iou).all() and np.isfinite(p.stability_score).all()
    cfg = backend.config()
    assert cfg["backend"] == "sam" and cfg["model_type"] == "tiny"
    assert len(cfg["checkpoint_sha256"]) == 64
    assert cfg["settings"]["points_per_side"] == 4


def test_sam_backend_in_bf16_runs_the_same_generator_under_autocast(proposals_synth, proposals_tiny_ckpt):
    """The GPU speed option, on the CPU: same code path, bf16 autocast, its own store identity."""
    image, _ = read_image(next((proposals_synth / "images/synthref").glob("*train*")))
    fp32 = SamBackend("tiny", proposals_tiny_ckpt, LOOSE)
    bf16 = SamBackend("tiny", proposals_tiny_ckpt, LOOSE, precision="bf16")
    p = bf16(image)
    assert len(p) >= 1
    _check_consistent(p, *image.shape[:2])
    assert fp32.config()["precision"] == "fp32" and bf16.config()["precision"] == "bf16"
    with pytest.raises(SemiresError, match="proposals.precision = 'fp16'"):
        SamBackend("tiny", proposals_tiny_ckpt, LOOSE, precision="fp16")


def test_sam_implementations_share_one_store_identity_where_their_masks_agree(proposals_tiny_ckpt):
    """fast and library give the same masks in float32: same config, so the store's bytes
    do not change; in bf16 or with a compiled encoder they can differ, and the config says
    which made them."""
    fast = SamBackend("tiny", proposals_tiny_ckpt, LOOSE)
    library = SamBackend("tiny", proposals_tiny_ckpt, LOOSE, implementation="library")
    assert fast.implementation == "fast" and "implementation" not in fast.config()
    assert fast.config() == library.config()
    for implementation in ("fast", "library"):
        bf16 = SamBackend("tiny", proposals_tiny_ckpt, LOOSE, precision="bf16", implementation=implementation)
        assert bf16.config()["implementation"] == implementation
    # torch.compile works lazily: nothing is compiled until the first image
    compiled = SamBackend("tiny", proposals_tiny_ckpt, LOOSE, implementation="fast-compiled")
    assert compiled.config()["implementation"] == "fast-compiled"
    model = compiled.generate.model
    for network in (model.image_encoder, model.mask_decoder):
        assert hasattr(network.forward, "_torchdynamo_orig_callable")  # wrapped by torch.compile
    with pytest.raises(SemiresError, match="proposals.sam_implementation = 'fastest'"):
        SamBackend("tiny", proposals_tiny_ckpt, LOOSE, implementation="fastest")


def test_sam_implementation_param_names_the_key_and_the_choices(tmp_path):
    from stages.params import section
    from stages.propose import ProposalsParams

    path = tmp_path / "params.yaml"
    path.write_text("proposals:\n  sam_implementation: fastest\n")
    with pytest.raises(SemiresError) as e:
        section(path, "proposals", ProposalsParams)
    assert str(e.value).endswith(
        "proposals.sam_implementation = 'fastest': expected one of fast, fast-compiled, library"
    )
    path.write_text("proposals:\n  sam_implementation: library\n")
    assert section(path, "proposals", ProposalsParams).sam_implementation == "library"


def test_propose_writes_the_same_store_with_the_fast_and_the_library_generator(tmp_path, monkeypatch):
    """The stage end to end with ``proposals.sam_implementation`` fast and library: the
    stores are byte for byte the same (a tiny random SAM shaped to keep several masks; a
    dataset of a few images)."""
    import yaml
    from typer.testing import CliRunner

    from semires import annotations
    from semires.proposals.sam import object_like
    from stages.cli import app

    proposals_synth = tmp_path / "synth"
    write_dataset(proposals_synth, SynthOptions(num_images=6, seed=4))
    torch.manual_seed(2)
    torch.save(object_like(build_tiny_sam()).state_dict(), tmp_path / "tiny.pth")
    anns = read_refer(proposals_synth, "synthref", "unc")
    annotations.save_images(tmp_path / "train_images.json", anns, "train")
    monkeypatch.delenv("SEMIRES_NPROC", raising=False)
    trees = {}
    for implementation in ("library", "fast"):
        params = tmp_path / f"params-{implementation}.yaml"
        doc = {
            "dataset": {
                "name": "synthref",
                "split_by": "unc",
                "refer_root": str(proposals_synth),
                "image_dir": str(proposals_synth / "images/synthref"),
            },
            "proposals": {
                "backend": "sam",
                "model_type": "tiny",
                "checkpoint": str(tmp_path / "tiny.pth"),
                "sam_implementation": implementation,
                "shard_images": 4,
                "generator": {"points_per_side": 3, "pred_iou_thresh": 0.01, "stability_score_thresh": 0.0},
            },
        }
        params.write_text(yaml.safe_dump(doc))
        out = tmp_path / f"{implementation}.zarr"
        args = ["propose", "--images", str(tmp_path / "train_images.json"), "--out", str(out)]
        args += ["--scratch", str(tmp_path / f"scratch-{implementation}"), "--params", str(params)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        trees[implementation] = {
            str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()
        }
    assert trees["fast"] == trees["library"]
    store = ProposalStore(tmp_path / "fast.zarr")
    assert sum(store.num_masks(i) for i in store.image_ids) >= 2 * len(store.image_ids)  # several masks each


def test_sam_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(SemiresError, match=r"nothere\.pth: SAM checkpoint not found"):
        SamBackend("vit_b", tmp_path / "nothere.pth")


def test_sam_checkpoint_of_another_model_type_is_one_clear_message(proposals_tiny_ckpt):
    with pytest.raises(SemiresError, match=r"tiny_sam\.pth: checkpoint does not match model type vit_b"):
        SamBackend("vit_b", proposals_tiny_ckpt)


def test_sam_checkpoint_that_is_not_one(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SemiresError, match=r"garbage\.pth: not a readable PyTorch checkpoint"):
        SamBackend("tiny", bad)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(SemiresError, match=r"broken\.jpg: not a readable image"):
        read_image(bad)
    with pytest.raises(SemiresError, match=r"gone\.jpg: cannot read image"):
        read_image(tmp_path / "gone.jpg")


@pytest.mark.skipif(importlib.util.find_spec("sam2") is None, reason="optional extra sam2 not installed")
def test_sam2_backend_checks_its_checkpoint(tmp_path, proposals_tiny_ckpt):
    from semires.proposals.sam2 import Sam2Backend

    with pytest.raises(SemiresError, match=r"nothere\.pt: SAM checkpoint not found"):
        Sam2Backend("configs/sam2.1/sam2.1_hiera_t.yaml", tmp_path / "nothere.pt")
    with pytest.raises(SemiresError, match=r"tiny_sam\.pth: checkpoint does not match SAM 2 config"):
        Sam2Backend("configs/sam2.1/sam2.1_hiera_t.yaml", proposals_tiny_ckpt)


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("sam2") is None, reason="optional extra sam2 not installed")
def test_sam2_backend_runs_its_automatic_mask_generator(tmp_path, proposals_synth):
    """A randomly initialised SAM 2 (hiera tiny, 39 M params) through SAM2AutomaticMaskGenerator."""
    from sam2.build_sam import build_sam2

    from semires.proposals.sam2 import Sam2Backend, Sam2Settings

    config = "configs/sam2.1/sam2.1_hiera_t.yaml"
    torch.manual_seed(0)
    torch.save({"model": build_sam2(config, None, device="cpu").state_dict()}, tmp_path / "sam2_t.pt")
    loose = Sam2Settings(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    backend = Sam2Backend(config, tmp_path / "sam2_t.pt", loose)
    image, _ = read_image(next((proposals_synth / "images/synthref").glob("*train*")))
    p = backend(image)
    assert backend.calls == 1 and len(p) >= 1
    _check_consistent(p, *image.shape[:2])
    assert backend.config()["model_config"] == config
