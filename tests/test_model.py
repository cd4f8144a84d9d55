"""LAVT: forward shapes, padding invariance, presets, and the errors of a missing weight file."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BertConfig

from semires.errors import SemiresError
from semires.model.build import PRESETS, ModelSpec, build_from_spec, count_parameters, prepare, preset

CORPUS = ["the red circle on the left", "the big blue square", "the green shape above the triangle"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    spec, model = prepare(preset("tiny"), corpus=CORPUS)
    return spec, model.eval()


def test_forward_gives_two_class_logits_at_input_size(tiny):
    spec, model = tiny
    ids, mask = spec.make_tokenizer().encode(["the red circle on the left", "the big blue square"], 20)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64), ids, mask)
    assert out.shape == (2, 2, 64, 64)
    assert torch.isfinite(out).all()


def test_stage_features_are_channels_last_and_halve(tiny):
    _, model = tiny
    x = model.backbone.embed(torch.rand(1, 3, 64, 64))
    shapes = []
    for i in range(4):
        x = model.backbone.stage(i, x)
        shapes.append(tuple(x.shape))
    assert shapes == [(1, 16, 16, 32), (1, 8, 8, 64), (1, 4, 4, 128), (1, 2, 2, 256)]


def test_extra_pad_tokens_do_not_change_the_output(tiny):
    spec, model = tiny
    tok = spec.make_tokenizer()
    image = torch.rand(2, 3, 64, 64)
    ids, mask = tok.encode(["the red circle on the left", "the square"], 12)
    ids_long, mask_long = tok.encode(["the red circle on the left", "the square"], 20)
    assert torch.equal(ids_long[:, :12], ids) and (ids_long[:, 12:] == tok.pad_id).all()
    with torch.no_grad():
        a = model(image, ids, mask)
        b = model(image, ids_long, mask_long)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_sentence_changes_the_output(tiny):
    spec, model = tiny
    ids, mask = spec.make_tokenizer().encode(["the red circle on the left", "the big blue square"], 20)
    image = torch.rand(1, 3, 64, 64).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(image, ids, mask)
    assert not torch.allclose(out[0], out[1])


def test_tokenizer_cuts_long_sentences_keeping_sep(tiny):
    spec, _ = tiny
    tok = spec.make_tokenizer()
    ids, mask = tok.encode([" ".join(["red"] * 40)], 20)
    assert mask.sum() == 20
    assert ids[0, -1] == tok._tok.token_to_id("[SEP]") and ids[0, 0] == tok._tok.token_to_id("[CLS]")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_runs(name):
    """Random weights; the paper preset at a 96 px input (same weights as at 480 px) to keep CI light."""
    cfg = preset(name)
    if cfg.pretrained:  # its BERT and tokenizer come from a folder: the same shapes, built here
        cfg = dataclasses.replace(cfg, image_size=96)
        tok = prepare(preset("tiny"), corpus=CORPUS)[0].tokenizer
        spec = ModelSpec(cfg, BertConfig().to_json_string(), tok)  # BertConfig() is bert-base
    else:
        spec = prepare(cfg, corpus=CORPUS)[0]
    model = build_from_spec(spec).eval()
    s = cfg.image_size
    ids, mask = spec.make_tokenizer().encode(["the red circle"], cfg.max_tokens)
    with torch.no_grad():
        out = model(torch.rand(1, 3, s, s), ids, mask)
    assert out.shape == (1, 2, s, s)
    n = count_parameters(model)
    if name == "paper":
        # Swin-B 87 M (no head) + BERT-base 109 M (no pooler) + PWAMs 8.5 M, gates 0.7 M, decoder 20.7 M.
        assert 220e6 < n < 235e6, n
    else:
        assert n < 5e6


def test_pretrained_preset_without_weights_is_a_clear_error():
    with pytest.raises(SemiresError, match="model.swin_weights"):
        prepare(preset("paper"))


def test_missing_weight_files_name_the_path(tmp_path):
    cfg = dataclasses.replace(
        preset("tiny"), pretrained=True, text=None
    )  # a pretrained config small enough to build
    with pytest.raises(SemiresError, match=r"nope\.pth: Swin checkpoint not found"):
        prepare(cfg, swin_weights=tmp_path / "nope.pth", bert_dir=tmp_path)


def test_unknown_preset_names_the_choices():
    with pytest.raises(SemiresError, match="paper, tiny"):
        preset("huge")


def test_pwam_heads_are_a_model_setting():
    from stages.burn_in import ModelParams, model_config

    cfg = model_config(ModelParams(preset="tiny", image_size=64, pwam_heads=(1, 2, 2, 4)))
    assert cfg.pwam_heads == (1, 2, 2, 4)
    spec, model = prepare(cfg, corpus=CORPUS)
    assert [f.heads for f in model.fusion] == [1, 2, 2, 4]
    assert build_from_spec(ModelSpec.from_dict(spec.to_dict())).fusion[3].heads == 4
    with pytest.raises(
        SemiresError, match=r"model PWAM heads \[1, 1, 1, 3\]: expected four head counts dividing"
    ):
        prepare(dataclasses.replace(cfg, pwam_heads=(1, 1, 1, 3)), corpus=CORPUS)
