"""Teacher-student training: the unsupervised loss, aligned views, the step, resume, diagnostics."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from semires import annotations
from semires.atomic import write_json
from semires.bits import unpack_bits
from semires.data import ColourJitter, HorizontalFlip, View, ViewConfig, swap_left_right
from semires.model.build import TextConfig, prepare, preset
from semires.proposals.base import Proposals
from semires.proposals.store import ImageResult, Layout, create, finish, write_shard
from semires.refer import read_refer
from semires.refine import RefineConfig, Refined, refine
from semires.semi import (
    SemiConfig,
    UnlabeledDataset,
    collate_unlabeled,
    laid_out,
    pixel_mean_loss,
    pseudo_label_quality,
    semi_step,
    train_semi,
    unlabeled_to_device,
    unsupervised_loss,
)
from semires.split import random_split
from semires.synth import SynthOptions, write_dataset
from semires.train import ExpressionDataset, evaluate, load_checkpoint, make_optimizer, poly_schedule
from stages.cli import app

SIZE = 64
CW = (0.9, 1.1)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("semi"))


def make_project(root):
    """A synthetic set, its annotation file, a 25 % split and a proposals store made of every
    annotated object's mask of each image plus one empty-handed image (no proposals)."""
    write_dataset(root / "refer", SynthOptions(num_images=16, seed=11))
    anns = read_refer(root / "refer", "synthref", "unc")
    annotations.save(root / "anns.json", anns)
    train_ids = anns.image_ids("train")
    write_json(root / "split" / "25.json", random_split(train_ids, 25, 0).to_json(anns))
    by_image: dict[int, list[np.ndarray]] = {}
    for r in anns.in_split("train"):
        by_image.setdefault(r.image_id, []).append(r.decode_mask())
    sizes = anns.images("train")  # image_id -> (file name, height, width)
    images = {}
    for k, i in enumerate(sorted(train_ids)):
        masks = by_image.get(i, [])
        if k == 0 or not masks:  # an image with zero proposals
            masks = np.zeros((0, sizes[i][1], sizes[i][2]), bool)
        images[i] = Proposals.from_masks(np.stack(masks) if len(masks) else masks)
    store = root / "proposals.zarr"
    layout = Layout.build({i: p.masks.shape[1:] for i, p in images.items()}, max_masks=16, shard_images=4)
    create(store, layout, {"backend": "test-oracle"})
    results = {i: ImageResult.from_proposals(p, len(p), "sha") for i, p in images.items()}
    for k in range(layout.num_shards):
        write_shard(store, layout, k, [results[layout.images[j][0]] for j in layout.shard(k)])
    finish(store, np.array([results[i].num_masks for i, _, _ in layout.images]))
    return root, anns, store, sorted(train_ids)[0]


def tiny(anns, seed=0):
    torch.manual_seed(seed)
    cfg = preset("tiny", image_size=SIZE)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text or TextConfig(), dropout=0.0))
    return prepare(cfg, corpus=[s for r in anns.refs for s in r.sentences])


def unlabeled(project, spec, **kw) -> UnlabeledDataset:
    root, anns, store, _ = project
    labeled = set(json.loads((root / "split" / "25.json").read_text())["labeled"])
    refs = [r for r in anns.in_split("train") if r.image_id not in labeled]
    return UnlabeledDataset(
        refs, root / "refer/images/synthref", spec.make_tokenizer(), store,
        image_size=SIZE, max_tokens=spec.config.max_tokens, **kw,
    )  # fmt: skip


def labeled(project, spec) -> ExpressionDataset:
    root, anns, _, _ = project
    ids = set(json.loads((root / "split" / "25.json").read_text())["labeled"])
    refs = [r for r in anns.in_split("train") if r.image_id in ids]
    return ExpressionDataset(
        refs, root / "refer/images/synthref", spec.make_tokenizer(), image_size=SIZE, max_tokens=20
    )


# --- the loss ------------------------------------------------------------------------------


def _refined(labels, weights, matched) -> Refined:
    return Refined(labels=labels, weights=weights, matched=matched, raw=labels)


def official_loss(stu_l, target_l, stu_u, pseudo, pwa_weight, matched, *, unsup_lambda=1.0, sup_factor=1.0):
    """A plain transcription of how the public teacher-student scripts add up their loss
    (criterion, WeightedCrossEntropyLoss, the two index lists, the halving, IOM's x10)."""

    def criterion(inp, tgt):
        return nn.CrossEntropyLoss(weight=torch.tensor(CW), reduction="none")(inp, tgt).mean()

    def weighted_ce_loss(inp, tgt, weight):
        return torch.mean(F.cross_entropy(inp, tgt, reduction="none") * weight)

    sup_loss = criterion(stu_l, target_l)
    batch_valid_idx = [b for b in range(len(matched)) if not matched[b]]  # no proposal matched
    wo_weight_idx = list(set(range(len(matched))) - set(batch_valid_idx))
    unsup_sam_loss = 0 if not wo_weight_idx else criterion(stu_u[wo_weight_idx], pseudo[wo_weight_idx])
    unsup_ori_loss = (
        0
        if not batch_valid_idx
        else weighted_ce_loss(stu_u[batch_valid_idx], pseudo[batch_valid_idx], pwa_weight[batch_valid_idx])
    )
    unsup_loss = unsup_ori_loss + unsup_sam_loss
    if wo_weight_idx and batch_valid_idx:
        unsup_loss = unsup_loss / 2.0
    sup_loss = sup_loss * sup_factor
    return sup_loss + unsup_lambda * unsup_loss


@pytest.mark.parametrize(
    "matched",
    [[True, True, True], [False, False, False], [True, False, True], [False, True, False]],
)
@pytest.mark.parametrize(("sup_weight", "unsup_weight"), [(1.0, 1.0), (10.0, 0.5)])
def test_the_step_loss_adds_up_as_the_public_scripts(matched, sup_weight, unsup_weight):
    torch.manual_seed(len(matched) + sum(matched))
    stu_l, stu_u = torch.randn(2, 2, 5, 7), torch.randn(3, 2, 5, 7)
    target = torch.randint(0, 2, (2, 5, 7))
    pseudo = torch.randint(0, 2, (3, 5, 7))
    w = torch.rand(3, 5, 7) + 0.1
    m = torch.tensor(matched)
    r = _refined(pseudo, torch.where(m[:, None, None], torch.ones_like(w), w), m)
    got = sup_weight * pixel_mean_loss(stu_l, target, CW) + unsup_weight * unsupervised_loss(stu_u, r, CW)
    want = official_loss(
        stu_l, target, stu_u, pseudo, w, matched, unsup_lambda=unsup_weight, sup_factor=sup_weight
    )
    torch.testing.assert_close(got, want)


def test_the_matched_group_is_one_mean_over_its_pixels_not_a_mean_of_sample_means():
    logits = torch.zeros(2, 2, 2, 2)
    logits[0, 1] = 3.0  # sample 0 confidently object, labelled object: small loss
    labels = torch.ones(2, 2, 2, dtype=torch.int64)
    labels[1, 0] = 0  # sample 1 half background (weight 0.9), half object (1.1), logits 0: ln 2
    r = _refined(labels, torch.ones(2, 2, 2), torch.tensor([True, True]))
    small = 1.1 * F.softplus(torch.tensor(-3.0))
    want = (4 * small + 2 * 0.9 * np.log(2) + 2 * 1.1 * np.log(2)) / 8
    torch.testing.assert_close(unsupervised_loss(logits, r, CW), want.float())
    assert not torch.allclose(  # PyTorch's weight-normalised mean is another number
        unsupervised_loss(logits, r, CW), F.cross_entropy(logits, labels, weight=torch.tensor(CW))
    )


def test_without_pwa_unmatched_samples_take_the_class_weighted_loss():
    torch.manual_seed(3)
    logits, labels = torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2, 4, 4))
    r = _refined(labels, torch.ones(2, 4, 4), torch.tensor([False, False]))
    torch.testing.assert_close(
        unsupervised_loss(logits, r, CW, pwa=False), pixel_mean_loss(logits, labels, CW)
    )
    plain = F.cross_entropy(logits, labels, reduction="none").mean()  # with PWA: no class weights
    torch.testing.assert_close(unsupervised_loss(logits, r, CW), plain)


# --- data ----------------------------------------------------------------------------------


def test_weak_and_strong_views_share_the_geometry_of_their_proposals(project):
    _, anns, _, _ = project
    spec, _ = tiny(anns)
    plain = unlabeled(project, spec)
    flipped = unlabeled(
        project, spec, geometric=HorizontalFlip(p=1.0), photometric=ColourJitter(0.4, 0.4, 0.4)
    )
    i = next(k for k in range(len(plain)) if plain[k].proposals.shape[0] > 0)
    a, b = plain[i], flipped[(i, 5)]
    assert torch.equal(b.weak, a.weak.flip(-1))
    assert torch.equal(unpack_bits(laid_out(b), SIZE), unpack_bits(laid_out(a), SIZE).flip(-1))
    assert torch.equal(b.gt, a.gt.flip(-1))
    assert b.sentence == swap_left_right(a.sentence)
    assert b.weak.dtype == torch.uint8 and b.strong is None  # pixels and jitter codes travel
    moved = unlabeled_to_device(collate_unlabeled([a, b]), torch.device("cpu"))
    assert moved.weak.dtype == torch.float32 and torch.equal(moved.weak[1], a.weak.flip(-1).float() / 255)
    assert torch.equal(moved.strong[0], moved.weak[0])  # no photometric transform: the weak view
    assert moved.strong[1].shape == moved.weak[1].shape and not torch.equal(moved.strong[1], moved.weak[1])
    # every object's mask is a proposal: the flipped truth is one of the flipped proposals
    assert any(torch.equal(p.to(torch.uint8), b.gt) for p in unpack_bits(laid_out(b), SIZE))


def test_views_made_on_the_device_are_the_views_the_loader_made(project):
    """The loader ships pixels, a blur radius and jitter numbers; on the device they give, pixel
    for pixel, the views of applying the same draws to the image in the loader."""
    _, anns, _, _ = project
    spec, _ = tiny(anns)
    geometric, photometric = ViewConfig(flip=True, blur_sigma=(0.1, 2.0)).views()
    ds = unlabeled(project, spec, geometric=geometric, photometric=photometric)
    keys = [(k % len(ds), 100 + k) for k in range(12)]
    items = [ds[k] for k in keys]
    for (index, _), item in zip(keys, items, strict=True):  # the loader flips, never blurs
        pixels = ds.pixels(ds.refs[int(ds.pairs[index][0])])
        assert torch.equal(item.weak, pixels) or torch.equal(item.weak, pixels.flip(-1))
    batch = unlabeled_to_device(collate_unlabeled(items), torch.device("cpu"))
    assert 0 < int((batch.blur > 0).sum()) < len(keys) and 0 < int(batch.jitter[:, 0].sum()) < len(keys)
    for i, (index, seed) in enumerate(keys):
        ref = ds.refs[int(ds.pairs[index][0])]
        gen = torch.Generator().manual_seed(seed)
        view = geometric(View(image=ds.image(ref)), gen)  # the [0, 1] image, blurred with PIL
        assert torch.equal(batch.weak[i], view.image)
        assert torch.equal(batch.strong[i], photometric(view, gen).image)


@pytest.mark.parametrize("rule", ["pil", "torch"])
def test_proposals_are_the_stores_masks_resized_nearest(project, rule):
    _, anns, _, _ = project
    spec, _ = tiny(anns)
    ds = unlabeled(project, spec, proposal_rule=rule)
    item = ds[0]
    want = ds.store.masks(item.image_id, size=(SIZE, SIZE), rule=rule)
    # the nonempty rows only travel, bit-packed, each with its place among the N x S rows
    assert item.proposals.dtype == torch.uint8 and item.proposals.shape[1] == SIZE // 8
    assert len(item.proposals) == int(want.any(-1).sum()) == len(item.proposal_rows)
    whole = laid_out(item)
    assert whole.shape == (len(want), SIZE, SIZE // 8) and torch.equal(unpack_bits(whole, SIZE), want)


def test_collate_pads_proposals_and_marks_the_real_ones(project):
    _, anns, _, _ = project
    spec, _ = tiny(anns)
    ds = unlabeled(project, spec)
    counts = {}
    for k in range(len(ds)):
        counts.setdefault(len(ds[k].valid), k)  # proposals per sample
    assert 0 in counts, "the fixture has an image without proposals"
    items = [ds[k] for k in counts.values()]
    batch = collate_unlabeled(items)
    n = max(counts)
    whole = laid_out(batch)
    assert whole.shape == (len(items), n, SIZE, SIZE // 8)  # bit-packed
    assert batch.valid.sum(1).tolist() == list(counts)
    assert not whole[~batch.valid].any()
    for k, it in enumerate(items):
        assert torch.equal(whole[k, : len(it.valid)], laid_out(it))
    moved = unlabeled_to_device(batch, torch.device("cpu"))  # laid out where the batch goes
    assert moved.proposal_rows is None and torch.equal(moved.proposals, whole)


# --- the step and the loop -----------------------------------------------------------------


def _cfg(**kw) -> SemiConfig:
    base = dict(steps=4, batch_size=2, unlabeled_batch_size=3, lr=1e-3, ema_rate=0.9, log_every=1)
    base.update(kw)
    return SemiConfig(**base)


def test_semi_step_moves_the_teacher_by_ema_of_the_updated_student(project):
    _, anns, _, _ = project
    spec, student = tiny(anns)

    teacher = copy.deepcopy(student).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    lab = torch.utils.data.default_collate([labeled(project, spec)[k] for k in range(2)])
    unl = collate_unlabeled([unlabeled(project, spec)[k] for k in range(3)])
    opt = make_optimizer(student, lr=1e-3, weight_decay=0.01)
    sched = poly_schedule(opt, total_steps=4, power=0.9)
    cfg = _cfg(sup_weight=10.0, unsup_weight=0.5)
    stats = semi_step(student, teacher, lab, unl, opt, sched, cfg=cfg, device=torch.device("cpu"))
    assert set(stats) == {"loss", "sup", "unsup", "matched", "raw_iou", "refined_iou"}
    torch.testing.assert_close(stats["loss"], 10.0 * stats["sup"] + 0.5 * stats["unsup"])
    assert all(torch.isfinite(v) for v in stats.values())
    after = student.state_dict()
    for k, t in teacher.state_dict().items():
        if t.is_floating_point():
            assert torch.allclose(t, 0.9 * before[k] + 0.1 * after[k], atol=1e-6), k


@pytest.mark.parametrize(("killed_workers", "resumed_workers"), [(0, 0), (2, 1)])
def test_resume_continues_a_killed_teacher_student_run_exactly(
    project, tmp_path, killed_workers, resumed_workers
):
    """An uninterrupted run in the main process; a killed one and its resumption with or
    without loader workers: the same steps, the same weights."""
    _, anns, _, _ = project

    def run(scratch, workers=0, **kw):
        spec, model = tiny(anns, seed=kw.pop("seed", 0))
        logs = []
        res = train_semi(
            model, spec, labeled(project, spec),
            unlabeled(project, spec, geometric=HorizontalFlip(), photometric=ColourJitter(0.4, 0.4, 0.4)),
            None, _cfg(checkpoint_every=100, num_workers=workers), scratch=scratch, run_key="k",
            on_metrics=lambda s, m: logs.append((s, m.get("train/loss"))), **kw,
        )  # fmt: skip
        return model, res, logs

    straight, a, logs_a = run(tmp_path / "a.pt")
    _, first, _ = run(tmp_path / "b.pt", killed_workers, stop_after=2)
    assert first.steps == 2
    resumed, b, logs_b = run(tmp_path / "b.pt", resumed_workers, resume=True, seed=9)
    assert b.resumed_from == 2 and b.steps == 4
    assert logs_b == logs_a[2:]
    for (k, x), y in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    for (k, x), y in zip(a.teacher.state_dict().items(), b.teacher.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_a_compiled_channels_last_run_trains_as_an_eager_one(project):
    """semi.compile: regional and semi.channels_last: the same steps (aot_eager: the graphs
    dynamo captures, differentiated by AOTAutograd, without code generation), a teacher of
    its own compiled forwards moved by EMA, the same weights to rounding, the state dict's keys."""
    from semires.model.speed import is_compiled

    _, anns, _, _ = project
    results = {}
    for fast in (False, True):
        spec, model = tiny(anns)
        speed = {"compile": "regional", "channels_last": True, "compile_backend": "aot_eager"} if fast else {}
        logs = []
        res = train_semi(
            model, spec, labeled(project, spec), unlabeled(project, spec), None, _cfg(**speed),
            scratch=project[0] / f"fast-{fast}.pt", run_key="k",
            on_metrics=lambda s, m, logs=logs: logs.append(m.get("train/loss")),
        )  # fmt: skip
        results[fast] = (model, res.teacher, logs)
    (plain, plain_t, plain_logs), (model, teacher, logs) = results[False], results[True]
    assert is_compiled(model.decoder) and is_compiled(teacher.decoder)
    assert teacher.decoder.forward.__self__ is teacher.decoder  # its own weights, not the student's
    assert model.decoder.classifier.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(logs) == 5 and logs[-1] is None  # four steps' losses, then the end's empty row
    assert logs[:4] == pytest.approx(plain_logs[:4], rel=1e-5)
    for a, b in ((model, plain), (teacher, plain_t)):
        assert list(a.state_dict()) == list(b.state_dict())
        diffs = [
            (x.float() - y.float()).abs().max()
            for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        ]
        # Adam moves a parameter whose gradient is rounding noise (PWAM's biases, which its
        # instance norms remove) by up to lr a step either way: the rest agrees closely
        assert max(diffs) <= 4 * 1e-3
        assert sorted(diffs)[len(diffs) * 3 // 4] <= 1e-5


def test_keep_best_val_selects_on_the_teachers_val_oiou(project):
    _, anns, _, _ = project
    spec, model = tiny(anns)
    val = torch.utils.data.Subset(labeled(project, spec), range(4))  # labeled expressions serve as val
    seen = {}

    def hook(step, metrics):
        if "val_teacher/oIoU" in metrics:
            seen[step] = metrics["val_teacher/oIoU"]

    res = train_semi(
        model, spec, labeled(project, spec), unlabeled(project, spec), val,
        _cfg(eval_every=1, keep="best_val", patience=2), scratch=project[0] / "best.pt", run_key="k",
        on_metrics=hook,
    )  # fmt: skip
    scores = [seen[s] for s in sorted(seen)]
    best = 1 + scores.index(max(scores))
    assert res.selected_step == best and res.final_eval.metrics["oIoU"] == max(scores)
    assert res.steps == min(4, best + 2)  # patience 2: two evaluations without a better one end it
    again = evaluate(res.teacher, val, device=torch.device("cpu"))
    assert again.metrics["oIoU"] == max(scores)  # the teacher holds the selected step's weights


class _Everything(nn.Module):
    """A 'teacher' that calls every pixel the object."""

    def forward(self, image, input_ids, attention_mask):
        b, _, h, w = image.shape
        return torch.stack([torch.zeros(b, h, w), torch.ones(b, h, w)], dim=1)


def test_pseudo_label_quality_scores_raw_and_refined_labels_against_the_truth(project):
    _, anns, _, _ = project
    spec, _ = tiny(anns)
    ds = unlabeled(project, spec)
    cfg = RefineConfig(strategy="cpi", pwa=True)
    q = pseudo_label_quality(_Everything(), ds, cfg, device=torch.device("cpu"), batch_size=4)
    items = [ds[k] for k in range(len(ds))]
    batch = collate_unlabeled(items)
    prob = torch.ones(len(items), SIZE, SIZE)
    r = refine(prob, laid_out(batch), batch.valid, cfg)
    gt = batch.gt.bool()

    def miou(pred):
        inter = (pred & gt).flatten(1).sum(1).float()
        union = (pred | gt).flatten(1).sum(1).float()
        return 100 * float(torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union)).mean())

    assert q["raw_mIoU"] == pytest.approx(miou(torch.ones_like(gt)))
    assert q["refined_mIoU"] == pytest.approx(miou(r.labels.bool()))
    assert q["refined_mIoU"] > q["raw_mIoU"] + 20  # every proposal lies inside "everything": their union
    assert q["match_rate"] == pytest.approx(100 * float(r.matched.float().mean()))
    assert q["match_rate"] + q["pwa_share"] == pytest.approx(100)


# --- the stage -----------------------------------------------------------------------------

runner = CliRunner()


def test_train_semi_stage_and_its_fair_control(project):
    root, _, store, _ = project
    params = {
        "dataset": {"image_dir": str(root / "refer/images/synthref")},
        "model": {"preset": "tiny", "image_size": SIZE},
        "burn_in": {"steps": 3, "batch_size": 2, "lr": 1e-3, "log_every": 1, "eval_every": 0},
        "semi": {
            "fractions": [25], "methods": ["cpi_pwa", "supervised"], "steps": 3, "batch_size": 2,
            "unlabeled_batch_size": 2, "lr": 1e-3, "log_every": 1, "eval_every": 0, "checkpoint_every": 2,
            "quality_samples": 8,
        },
    }  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    common = ["--params", str(root / "params.yaml"), "--anns", str(root / "anns.json")]
    res = runner.invoke(
        app,
        ["burn-in", "--split", str(root / "split/25.json"), "--out", str(root / "b.pt"),
         "--live", str(root / "blive"), "--scratch", str(root / "scratch"), *common],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for method in ("cpi_pwa", "supervised"):
        out = root / method / "model.pt"
        res = runner.invoke(
            app,
            ["train-semi", "--method", method, "--split", str(root / "split/25.json"),
             "--burn-in", str(root / "b.pt"), "--proposals", str(store), "--out", str(out),
             "--live", str(root / method / "live"), "--quality", str(root / method / "q.json"),
             "--scratch", str(root / "scratch"), *common],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        ckpt = load_checkpoint(out)
        assert ckpt.meta["method"] == method and ckpt.step == 3
        assert (ckpt.teacher is not None) == (method != "supervised")
        assert (root / method / "live" / "metrics.json").is_file()
        quality = json.loads((root / method / "q.json").read_text())[f"{method}/25"]
        if method == "supervised":
            assert quality == {}
        else:
            assert set(quality) == {"start", "end"}
            assert {"raw_mIoU", "refined_mIoU", "match_rate", "pwa_share"} <= set(quality["start"])
    bad = runner.invoke(
        app,
        ["train-semi", "--method", "cpi-sam", "--split", str(root / "split/25.json"),
         "--burn-in", str(root / "b.pt"), "--out", str(root / "x.pt"), "--live", str(root / "x"),
         "--quality", str(root / "x.json"), *common],
    )  # fmt: skip
    assert bad.exit_code == 2 and "--method 'cpi-sam'" in bad.output
