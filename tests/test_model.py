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


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_cut_long_sentences_as_lavt(name):
    """LAVT keeps the first 20 ids of ``[CLS] words [SEP]``: a long sentence loses its [SEP]."""
    assert preset(name).truncation == "lavt"


def test_tokenizer_truncation_modes(tiny):
    spec, _ = tiny
    cls_id, sep_id, red = (spec.make_tokenizer()._tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "red"))
    long = " ".join(["red"] * 40)
    ids, mask = spec.make_tokenizer().encode([long, "red"], 20)  # the spec's mode: lavt
    assert mask[0].sum() == 20 and ids[0].tolist() == [cls_id] + [red] * 19
    assert ids[1, :4].tolist() == [cls_id, red, sep_id, 0] and mask[1].sum() == 3
    keep = dataclasses.replace(spec, config=dataclasses.replace(spec.config, truncation="keep_sep"))
    ids, mask = keep.make_tokenizer().encode([long], 20)
    assert mask.sum() == 20 and ids[0].tolist() == [cls_id] + [red] * 18 + [sep_id]


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


def test_pwam_heads_and_truncation_are_model_settings():
    from stages.burn_in import ModelParams, model_config

    cfg = model_config(
        ModelParams(preset="tiny", image_size=64, pwam_heads=(1, 2, 2, 4), truncation="keep_sep")
    )
    assert cfg.pwam_heads == (1, 2, 2, 4) and cfg.truncation == "keep_sep"
    spec, model = prepare(cfg, corpus=CORPUS)
    assert [f.heads for f in model.fusion] == [1, 2, 2, 4]
    assert build_from_spec(ModelSpec.from_dict(spec.to_dict())).fusion[3].heads == 4
    assert spec.make_tokenizer().truncation == "keep_sep"
    with pytest.raises(SemiresError, match="model.truncation"):
        ModelParams(truncation="cut")
    with pytest.raises(
        SemiresError, match=r"model PWAM heads \[1, 1, 1, 3\]: expected four head counts dividing"
    ):
        prepare(dataclasses.replace(cfg, pwam_heads=(1, 1, 1, 3)), corpus=CORPUS)
