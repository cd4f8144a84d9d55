"""The training pieces: schedule, optimiser groups, loss, overfitting, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from semires.data import ExpressionDataset
from semires.errors import SemiresError
from semires.model.build import TextConfig, prepare, preset
from semires.refer import read_refer
from semires.synth import SynthOptions, write_dataset
from semires.train import (
    LoopConfig,
    evaluate,
    load_checkpoint,
    load_model,
    make_optimizer,
    param_groups,
    poly_factor,
    poly_schedule,
    save_checkpoint,
    segmentation_loss,
    train_supervised,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    write_dataset(root, SynthOptions(num_images=8, seed=5))
    return read_refer(root, "synthref", "unc"), root / "images" / "synthref"


def tiny_model(anns, *, dropout: float = 0.1, size: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = preset("tiny", image_size=size)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text or TextConfig(), dropout=dropout))
    return prepare(cfg, corpus=[s for r in anns.refs for s in r.sentences])


def dataset(spec, refs, image_dir) -> ExpressionDataset:
    return ExpressionDataset(
        refs,
        image_dir,
        spec.make_tokenizer(),
        image_size=spec.config.image_size,
        max_tokens=spec.config.max_tokens,
    )


def test_poly_schedule_starts_at_lr_and_reaches_zero_at_the_last_step():
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, lr=5e-5, weight_decay=1e-2)
    sched = poly_schedule(opt, total_steps=5, power=0.9)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 5e-5 and lrs[-1] == 0.0
    assert lrs[2] == pytest.approx(5e-5 * 0.5**0.9)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert poly_factor(0, 1, 0.9) == 1.0


def test_adamw_is_the_fused_kernel_on_cpu():
    assert make_optimizer(torch.nn.Linear(2, 2), lr=1e-3, weight_decay=0.0).defaults["fused"] is True


def test_no_weight_decay_on_norms_and_position_biases(synth):
    anns, _ = synth
    _, model = tiny_model(anns)
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert any("relative_position_bias_table" in n for n in skipped)
    assert any("position_embeddings" in n for n in skipped)
    assert any(n.startswith("norms.") for n in skipped) and any("LayerNorm" in n for n in skipped)
    assert not any("qkv.weight" in n for n in skipped)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loss_is_class_weighted_cross_entropy():
    logits, target = torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2, 4, 4))
    expected = F.cross_entropy(logits, target, weight=torch.tensor([0.9, 1.1]))
    torch.testing.assert_close(segmentation_loss(logits, target, (0.9, 1.1)), expected)
    ones = torch.ones(2, 4, 4)
    torch.testing.assert_close(segmentation_loss(logits, target, (0.9, 1.1), ones), expected)
    zero_first = ones.clone()
    zero_first[0] = 0
    only_second = segmentation_loss(logits, target, (0.9, 1.1), zero_first)
    assert only_second < segmentation_loss(logits, target, (0.9, 1.1), ones) * 2


def test_tiny_model_overfits_a_handful_of_samples(synth, tmp_path):
    anns, image_dir = synth
    # The four largest objects: at 64 px the decoder's 16 x 16 map cannot trace the smallest ones.
    refs = sorted(anns.in_split("train"), key=lambda r: -r.bbox[2] * r.bbox[3])[:4]
    spec, model = tiny_model(anns, dropout=0.0)
    data = dataset(spec, refs, image_dir)
    cfg = LoopConfig(steps=250, batch_size=4, lr=2e-3, weight_decay=0.0, checkpoint_every=1000, log_every=50)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is as fast, and far faster when the CPU is shared
    try:
        train_supervised(model, spec, data, None, cfg, scratch=tmp_path / "s.pt", run_key="k")
    finally:
        torch.set_num_threads(threads)
    ev = evaluate(model, data, device=torch.device("cpu"), batch_size=8)
    assert ev.metrics["mIoU"] > 90, ev.metrics
    assert len(ev.results) == len(data)
    # At the images' own resolution (logits upsampled): same expressions, full-size pixel counts.
    full = evaluate(model, data, device=torch.device("cpu"), batch_size=8, resolution="original")
    assert [r.ref_id for r in full.results] == [r.ref_id for r in ev.results]
    areas = [int(data.full_mask(i).sum()) for i in range(len(data))]
    assert all(r.union >= a for r, a in zip(full.results, areas, strict=True))
    assert full.metrics["mIoU"] > 80, full.metrics


def test_checkpoint_round_trip_gives_the_same_predictions(synth, tmp_path):
    anns, image_dir = synth
    spec, model = tiny_model(anns)
    path = tmp_path / "model.pt"
    save_checkpoint(path, spec=spec, model=model, step=7, meta={"percent": 5.0})
    spec2, model2, ckpt = load_model(path)
    assert spec2.fingerprint() == spec.fingerprint() and ckpt.step == 7 and ckpt.meta["percent"] == 5.0
    data = dataset(spec2, anns.refs[:3], image_dir)
    a = evaluate(model.eval(), data, device=torch.device("cpu"))
    b = evaluate(model2, data, device=torch.device("cpu"))
    assert a.results == b.results


def test_checkpoint_of_another_model_or_run_is_refused(synth, tmp_path):
    anns, _ = synth
    spec, model = tiny_model(anns)
    path = tmp_path / "model.pt"
    save_checkpoint(path, spec=spec, model=model, step=1, run_key="run-a")
    other = tiny_model(anns, size=96)[0]
    with pytest.raises(SemiresError, match="another model configuration"):
        load_checkpoint(path, expect_fingerprint=other.fingerprint())
    with pytest.raises(SemiresError, match="other inputs"):
        load_checkpoint(path, expect_fingerprint=spec.fingerprint(), expect_run_key="run-b")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SemiresError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(SemiresError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_checkpoint_of_an_earlier_semires_is_refused_with_the_reason(synth, tmp_path):
    """Version 1 checkpoints hold weights of another function (timm's windows, other upsampling)."""
    anns, _ = synth
    spec, model = tiny_model(anns)
    path = tmp_path / "model.pt"
    save_checkpoint(path, spec=spec, model=model, step=1)
    obj = torch.load(path, weights_only=True)
    obj["version"] = 1
    torch.save(obj, path)
    why = r"model.pt: checkpoint version 1, this semires reads 2: written by an earlier semires whose LAVT"
    with pytest.raises(SemiresError, match=why + r" computed another function .*; retrain it"):
        load_model(path)


def test_resume_continues_a_killed_run_exactly(synth, tmp_path):
    """K steps in one go == k steps, stop, fresh model + resume to K (dropout on: RNG restored)."""
    anns, image_dir = synth
    refs = anns.in_split("train")
    cfg = LoopConfig(steps=6, batch_size=2, lr=1e-3, checkpoint_every=100, log_every=1)

    def run(scratch, **kw):
        spec, model = tiny_model(anns, dropout=0.1, seed=kw.pop("seed", 0))
        logs = []
        res = train_supervised(
            model, spec, dataset(spec, refs, image_dir), None, cfg, scratch=scratch, run_key="k",
            on_metrics=lambda s, m: logs.append((s, m["train/loss"])), **kw,
        )  # fmt: skip
        return model, res, logs

    straight, _, logs_a = run(tmp_path / "a.pt")
    _, first, _ = run(tmp_path / "b.pt", stop_after=3)
    assert first.steps == 3 and load_checkpoint(tmp_path / "b.pt").step == 3
    resumed, second, logs_b = run(
        tmp_path / "b.pt", resume=True, seed=99
    )  # other init: all state comes from disk
    assert second.resumed_from == 3 and second.steps == 6
    assert logs_b == logs_a[3:]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(("killed", "resumed"), [(True, False), (False, True)])
def test_resume_across_the_channels_last_setting_continues_exactly(synth, tmp_path, killed, resumed):
    """channels_last is a knob of speed: a run killed with one setting resumes with the other
    to the weights of an unbroken run (the saved AdamW moments are laid out as the new
    parameters: the fused kernel would otherwise pair wrong elements)."""
    anns, image_dir = synth
    refs = anns.in_split("train")

    def run(scratch, channels_last, **kw):
        spec, model = tiny_model(anns, dropout=0.1)
        cfg = LoopConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=100, log_every=1,
                         channels_last=channels_last)  # fmt: skip
        train_supervised(
            model, spec, dataset(spec, refs, image_dir), None, cfg, scratch=scratch, run_key="k", **kw
        )
        return model

    straight = run(tmp_path / "a.pt", resumed)
    run(tmp_path / "b.pt", killed, stop_after=2)
    resumed_model = run(tmp_path / "b.pt", resumed, resume=True)
    conv = resumed_model.decoder.fuse[0][0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == resumed
    for (k, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_state_like_params_lays_moments_out_as_their_parameters():
    from semires.train import state_like_params

    p = torch.nn.Parameter(torch.randn(2, 3, 2, 2).contiguous(memory_format=torch.channels_last))
    opt = torch.optim.AdamW([p])
    moment = torch.arange(24.0).view(2, 3, 2, 2)  # contiguous: as saved by a run without channels-last
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": moment}
    state_like_params(opt)
    assert opt.state[p]["exp_avg"].stride() == p.stride() and torch.equal(opt.state[p]["exp_avg"], moment)
    assert opt.state[p]["step"].shape == ()


def test_best_on_val_keeps_the_best_evaluation_and_stops_after_its_patience():
    from semires.train import BestOnVal

    net = torch.nn.Linear(2, 1)
    best = BestOnVal(patience=2)
    for step, oiou in enumerate([10.0, 12.0, 12.0, 11.0], start=1):  # equal is not better
        with torch.no_grad():
            net.weight.fill_(step)
        best.update(step, {"oIoU": oiou}, {"model": net})
    assert best.step == 2 and best.stale == 2 and best.exhausted()
    copy = BestOnVal(patience=2)
    copy.load(best.state())  # as a resumed run reads it from the scratch checkpoint
    copy.restore({"model": net})
    assert copy.step == 2 and torch.all(net.weight == 2)
    assert not BestOnVal(patience=None).exhausted()


def test_keep_best_val_writes_the_best_steps_weights_and_resumes_to_them(synth, tmp_path):
    anns, image_dir = synth
    train, val = anns.in_split("train"), anns.in_split("val")
    cfg = LoopConfig(steps=6, batch_size=2, lr=3e-3, eval_every=1, checkpoint_every=100, log_every=1,
                     keep="best_val")  # fmt: skip

    def run(scratch, **kw):
        spec, model = tiny_model(anns, dropout=0.0, seed=kw.pop("seed", 0))
        seen = {}

        def hook(step, metrics):
            if "val/oIoU" in metrics:
                seen[step] = (metrics["val/oIoU"], {k: v.clone() for k, v in model.state_dict().items()})

        res = train_supervised(
            model, spec, dataset(spec, train, image_dir), dataset(spec, val, image_dir), cfg, scratch=scratch,
            run_key="k", on_metrics=hook, **kw,
        )  # fmt: skip
        return model, res, seen

    model, res, seen = run(tmp_path / "a.pt")
    scores = [seen[s][0] for s in sorted(seen)]
    assert res.steps == 6 and res.selected_step == 1 + scores.index(max(scores))
    assert res.final_eval.metrics["oIoU"] == max(scores)
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[res.selected_step][1][k]), k
    run(tmp_path / "b.pt", stop_after=3)
    resumed, res_b, _ = run(tmp_path / "b.pt", resume=True, seed=9)
    assert res_b.selected_step == res.selected_step
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
