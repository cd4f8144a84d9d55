"""The paper's recipe: the params that select the public scripts' behaviour, and their errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from semires.errors import SemiresError
from stages.burn_in import BurnInParams
from stages.evaluate import EvaluateParams
from stages.params import section
from stages.train_semi import AugmentParams, SemiParams


def _section(tmp_path, name, cls, value):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({name: value}))
    return section(path, name, cls)


# (section, class, value, the message docs/errors.md shows)
BAD = [
    (
        "burn_in",
        BurnInParams,
        {"steps": 100, "lr_horizon": 50},
        "params.yaml: burn_in.lr_horizon = 50: expected null (decay to 0 at the last step) or a step count "
        ">= burn_in.steps (100)",
    ),
    (
        "burn_in",
        BurnInParams,
        {"keep": "best"},
        "params.yaml: burn_in.keep = 'best': expected last (the last step's weights) or best_val (the best "
        "val oIoU's, as the official scripts)",
    ),
    (
        "semi",
        SemiParams,
        {"patience": 5},
        "params.yaml: semi.patience = 5: expected null, or with keep: best_val the evaluations without a "
        "better val oIoU before stopping",
    ),
    (
        "evaluate",
        EvaluateParams,
        {"precision": "fp16"},
        "params.yaml: evaluate.precision = 'fp16': expected fp32 (the paper's) or bf16 "
        "(autocast, faster on a GPU)",
    ),
    (
        "burn_in",
        BurnInParams,
        {"no_decay": "bias"},
        "params.yaml: burn_in.no_decay = 'bias': expected official (no decay on the backbone's norms and "
        "position biases only) or norms (on every normalisation layer and position bias/embedding)",
    ),
    (
        "semi",
        SemiParams,
        {"bert_layers": -1},
        "params.yaml: semi.bert_layers = -1: expected null (all of BERT trains) or how many of its first "
        "encoder layers train (official: 10)",
    ),
    (
        "semi",
        SemiParams,
        {"proposal_resize": "bilinear"},
        "params.yaml: semi.proposal_resize = 'bilinear': expected pil (as the ground truth) or torch "
        "(F.interpolate, as the official code)",
    ),
    (
        "semi",
        SemiParams,
        {"augment": {"blur_p": 2}},
        "params.yaml: semi.augment.blur_p = 2.0: expected a probability in [0, 1]",
    ),
    (
        "semi",
        SemiParams,
        {"augment": {"jitter_p": -0.5}},
        "params.yaml: semi.augment.jitter_p = -0.5: expected a probability in [0, 1]",
    ),
    (
        "semi",
        SemiParams,
        {"augment": {"blur_sigma": [2, 0.1]}},
        "params.yaml: semi.augment.blur_sigma = [2.0, 0.1]: expected [lo, hi] with 0 < lo <= hi <= 50 "
        "pixels, e.g. [1, 1] (the official radius)",
    ),
    (
        "semi",
        SemiParams,
        {"sup_weight": 0},
        "params.yaml: semi.sup_weight = 0.0: expected a positive factor, e.g. 1",
    ),
]


@pytest.mark.parametrize(("name", "cls", "value", "message"), BAD)
def test_bad_recipe_params_are_named(tmp_path, name, cls, value, message):
    with pytest.raises(SemiresError) as e:
        _section(tmp_path, name, cls, value)
    assert str(e.value) == message


def test_one_definition_per_setting_the_sections_are_the_library_configs(tmp_path):
    from semires.data import ViewConfig
    from semires.refine import RefineConfig
    from stages.train_semi import RefineParams

    assert AugmentParams is ViewConfig
    lib = {f.name: f.default for f in dataclasses.fields(RefineConfig) if f.name not in ("strategy", "pwa")}
    assert {f.name: f.default for f in dataclasses.fields(RefineParams)} == lib
    with pytest.raises(
        SemiresError, match=r"semi\.refine\.cover_thresh = 1\.5: expected a threshold in \[0, 1\)"
    ):
        _section(tmp_path, "semi", SemiParams, {"refine": {"cover_thresh": 1.5}})


def test_the_default_views_are_the_official_scripts():
    from semires.data import ColourJitter, Compose, GaussianBlur

    weak, strong = AugmentParams().views()
    assert isinstance(weak, Compose) and weak.transforms == [GaussianBlur(p=0.5, sigma=(1.0, 1.0))]  # no flip
    assert strong == ColourJitter(0.25, 0.25, 0.25, 0.25, p=0.5, random_order=True)
    weak, _ = AugmentParams(flip=False, blur_p=0.0).views()
    assert weak is None  # the resized image as it is


# --- what trains, and how: the official optimiser ----------------------------------------

OFFICIAL = Path(__file__).parent / "data" / "lavt_official"


def official_groups(model_keys, bert_keys, params):
    """A transcription of the official get_optim_param over the official names: the
    backbone's parameters split by name, the classifier's, BERT's encoder layers 0-9."""
    backbone = [k.removeprefix("backbone.") for k in model_keys if k.startswith("backbone.") and k in params]
    no_decay = {
        "backbone." + n
        for n in backbone
        if "norm" in n or "absolute_pos_embed" in n or "relative_position_bias_table" in n
    }
    decay = {"backbone." + n for n in backbone} - no_decay
    decay |= {k for k in model_keys if k.startswith("classifier.") and k in params}
    decay |= {k for k in bert_keys if any(k.startswith(f"bert_model: encoder.layer.{i}.") for i in range(10))}
    return decay, no_decay


def test_the_official_optimiser_groups_on_the_official_names():
    from semires.model.official import convert_state, import_official, read_official
    from semires.train import param_groups

    ck = read_official(OFFICIAL / "official_checkpoint.pth")
    model = import_official(OFFICIAL / "official_checkpoint.pth", OFFICIAL / "bert").model
    origin = convert_state(ck).origin  # semires key -> official key
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.01, no_decay="official", bert_layers=10)
    decay = {origin[names[id(p)]] for p in groups[0]["params"]}
    no_decay = {origin[names[id(p)]] for p in groups[1]["params"]}
    official_params = set(origin[n] for n in names.values())
    bert_keys = {v for v in origin.values() if v.startswith("bert_model: ")}
    want_decay, want_no_decay = official_groups(list(ck.model), bert_keys, official_params)
    assert no_decay == want_no_decay and decay == want_decay
    assert len(no_decay) > 20 and len(decay) > 100
    assert any("fusion" in k for k in decay) and any("res_gate" in k for k in decay)  # PWAM, gates decay
    assert any(k.startswith("classifier.") and ".bn" in k for k in decay)  # the decoder's BatchNorms too
    assert any("LayerNorm" in k for k in decay)  # and BERT's LayerNorms
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("text.bert.embeddings.") for n in frozen)  # 1 layer: all train


def test_bert_layers_freeze_embeddings_and_the_later_layers_and_norms_rule_keeps_semires():
    from semires.model.build import TextConfig, prepare, preset
    from semires.train import param_groups

    config = preset("tiny", image_size=64, text=TextConfig(num_layers=12, hidden_size=16, num_heads=2))
    model = prepare(config, corpus=["a left dog", "the right cat"])[1]
    groups = param_groups(model, 0.01, no_decay="official", bert_layers=10)
    trained = {id(p) for g in groups for p in g["params"]}
    for n, p in model.named_parameters():
        later = ("text.bert.encoder.layer.10.", "text.bert.encoder.layer.11.")
        frozen = n.startswith("text.bert.embeddings.") or n.startswith(later)
        assert (id(p) not in trained and not p.requires_grad) == frozen, n
    model = prepare(config, corpus=["a left dog"])[1]
    decay, no_decay = param_groups(model, 0.01)  # semires: every norm and position embedding exempt
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert (
        "text.bert.embeddings.LayerNorm.weight" in exempt
        and "text.bert.embeddings.position_embeddings.weight" in exempt
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_bert_dropout_off_keeps_the_text_encoder_in_eval_mode_through_evaluation():
    from semires.model.build import TextConfig, prepare, preset
    from semires.train import training_mode

    model = prepare(preset("tiny", image_size=64, text=TextConfig(dropout=0.1)), corpus=["a dog"])[1]
    training_mode(model, bert_dropout=False)
    assert model.training and model.decoder.training and not model.text.training
    assert not any(m.training for m in model.text.modules())
    training_mode(model, bert_dropout=True)
    assert all(m.training for m in model.text.modules())


# --- evaluation precision ------------------------------------------------------------------


def test_evaluation_is_fp32_by_default_and_bf16_on_request():
    import torch

    from semires.logits import forward
    from semires.model.build import prepare, preset

    torch.manual_seed(0)
    model = prepare(preset("tiny", image_size=64), corpus=["the left dog"])[1].eval()
    image, ids = torch.rand(2, 3, 64, 64), torch.randint(1, 20, (2, 6))
    att = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(image, ids, att)
    fp32 = forward(model, image, ids, att)
    bf16 = forward(model, image, ids, att, precision="bf16")
    assert torch.equal(fp32, plain) and fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(bf16, plain) and torch.allclose(bf16, plain, atol=0.5)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        forward(model, image, ids, att, precision="fp16")


# --- the schedule ----------------------------------------------------------------------------


def test_lr_horizon_is_the_official_lambda_and_the_paper_recipes_last_rates():
    import torch

    from semires.train import poly_factor, poly_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    ours = torch.optim.SGD([p], lr=5e-5)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    # burn-in, RefCOCO 1 %: 432 refs / 4 GPUs / batch 2 = 54 batches an epoch, 40 epochs
    sched = poly_schedule(ours, total_steps=2160, power=0.9, horizon=54 * 40)
    official = torch.optim.lr_scheduler.LambdaLR(theirs, lambda x: (1 - x / (54 * 40)) ** 0.9)
    for _ in range(2160):
        assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
        last = ours.param_groups[0]["lr"]
        ours.step(), sched.step(), theirs.step(), official.step()
    assert last == pytest.approx(4.988e-8, rel=1e-3)  # semires' own schedule ends at 0
    assert poly_factor(2159, 2160, 0.9) == 0.0
    # teacher-student: 3,497 unlabeled + 36 labeled batches in the horizon, 40 epochs of 3,497 steps
    assert 5e-5 * poly_factor(139_879, 139_880, 0.9, horizon=(3497 + 36) * 40) == pytest.approx(
        8.065e-7, rel=1e-3
    )
