"""Loading real weights from small files written in the real formats.

* Swin: the original Microsoft layout (``{"model": state_dict}``; patch merging at the *end*
  of stages 0-2 as ``layers.i.downsample``, a final ``norm``, a ``head`` Linear,
  ``relative_position_index`` and ``attn_mask`` buffers). The file is made from a small
  *timm* Swin (not semires' own) by undoing exactly the renames timm's
  ``checkpoint_filter_fn`` documents, plus the original's buffers and head, so the test also
  checks that semires' Swin keeps timm's key layout.
* BERT: a directory written by ``BertModel.save_pretrained`` and ``BertTokenizerFast.save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import timm
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from semires.errors import SemiresError
from semires.model.build import TextConfig, prepare, preset
from semires.model.swin import SwinConfig, create_swin, load_original_checkpoint
from semires.model.text import TextTokenizer

SMALL_SWIN = SwinConfig(
    embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0
)
CORPUS = ["the red circle on the left", "the big blue square", "the green shape above the triangle"]


def timm_swin(config: SwinConfig, image_size: int):
    """timm's own Swin of that architecture (random weights)."""
    return timm.create_model(
        "swin_base_patch4_window12_384",
        pretrained=False,
        img_size=image_size,
        embed_dim=config.embed_dim,
        depths=config.depths,
        num_heads=config.num_heads,
        window_size=config.window_size,
        drop_path_rate=0.0,
        num_classes=0,
    )


def original_layout(swin) -> dict[str, torch.Tensor]:
    """timm state dict -> the layout of Microsoft's released Swin checkpoints."""
    out = {}
    for k, v in swin.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k] = v.clone()
    for name, mod in swin.named_modules():
        if hasattr(mod, "relative_position_index"):
            out[f"{name}.relative_position_index"] = mod.relative_position_index.clone()
    out["head.weight"] = torch.randn(1000, swin.num_features)
    out["head.bias"] = torch.zeros(1000)
    return out


@pytest.fixture
def swin_file(tmp_path):
    torch.manual_seed(1)
    src = timm_swin(SMALL_SWIN, 256)
    state = original_layout(src)
    assert "layers.0.downsample.reduction.weight" in state and "layers.3.downsample.norm.weight" not in state
    path = tmp_path / "swin_small_original.pth"
    torch.save({"model": state}, path)
    return path, src


def test_original_swin_checkpoint_loads_every_weight(swin_file):
    path, src = swin_file
    torch.manual_seed(2)
    dst = create_swin(SMALL_SWIN)
    load_original_checkpoint(dst, path)
    theirs = src.state_dict()
    for k, v in dst.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    # Every weight but the final norm (LAVT normalises each fused stage instead) has its place.
    assert {k for k in theirs if not k.startswith("norm.")} == set(dst.state_dict())


def test_swin_computes_timms_function_where_the_two_agree(swin_file):
    """At 256 px, window 4, every stage (64, 32, 16, 8) is a multiple of the window and larger
    than it: there timm's order (shift, then pad) and LAVT's (pad, then shift) coincide."""
    path, src = swin_file
    dst = create_swin(SMALL_SWIN)
    load_original_checkpoint(dst, path)
    src.eval(), dst.eval()
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        a, b = src.patch_embed(x), dst.embed(x)
        torch.testing.assert_close(a, b)
        for i in range(4):
            a, b = src.layers[i](a), dst.stage(i, b)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_swin_checkpoint_of_another_size_is_refused(swin_file):
    path, _ = swin_file
    bigger = create_swin(dataclasses.replace(SMALL_SWIN, embed_dim=32))
    with pytest.raises(SemiresError, match="another Swin size"):
        load_original_checkpoint(bigger, path)


def test_swin_checkpoint_that_is_not_one_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SemiresError, match="bad.pth: not a readable PyTorch checkpoint"):
        load_original_checkpoint(create_swin(SMALL_SWIN), bad)


@pytest.fixture
def bert_dir(tmp_path):
    tok = TextTokenizer.build_wordpiece(CORPUS, 200)
    torch.manual_seed(3)
    bert = BertModel(
        BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=32),
    )  # fmt: skip
    path = tmp_path / "bert"
    bert.save_pretrained(path)
    tok.save_pretrained(path)
    return path, bert


def test_pretrained_config_loads_swin_file_and_bert_dir(swin_file, bert_dir):
    swin_path, src_swin = swin_file
    bdir, src_bert = bert_dir
    cfg = dataclasses.replace(preset("paper"), image_size=64, swin=SMALL_SWIN)
    spec, model = prepare(cfg, swin_weights=swin_path, bert_dir=bdir)
    for k, v in src_bert.state_dict().items():
        if not k.startswith("pooler"):
            assert torch.equal(model.text.bert.state_dict()[k], v), k
    for k, v in src_swin.state_dict().items():
        if k.startswith("norm."):  # Swin's final norm is unused: LAVT normalises each fused stage
            continue
        assert torch.equal(model.backbone.state_dict()[k], v), k
    # The tokenizer gives the ids of transformers' own loader of that folder.
    ref = BertTokenizerFast.from_pretrained(str(bdir))("the red circle on the left")["input_ids"]
    ids, mask = spec.make_tokenizer().encode(["the red circle on the left"], 20)
    assert ids[0, : mask.sum()].tolist() == ref
    assert spec.config.text is None and "hidden_size" in spec.bert_config


def test_missing_bert_dir_names_the_key(swin_file, tmp_path):
    swin_path, _ = swin_file
    cfg = dataclasses.replace(preset("paper"), image_size=64, swin=SMALL_SWIN)
    with pytest.raises(SemiresError, match="model.bert_dir"):
        prepare(cfg, swin_weights=swin_path, bert_dir=tmp_path / "no_bert")


def test_wordpiece_vocabulary_is_deterministic():
    a = TextTokenizer.build_wordpiece(CORPUS * 3, 300).to_str()
    b = TextTokenizer.build_wordpiece(list(reversed(CORPUS)), 300).to_str()
    assert a == b


def test_small_text_config_is_respected():
    cfg = dataclasses.replace(preset("tiny"), text=TextConfig(hidden_size=48, num_layers=1, num_heads=2))
    _, model = prepare(cfg, corpus=CORPUS)
    assert model.text.dim == 48 and model.text.bert.config.num_hidden_layers == 1
