"""Checkpoints of the official LAVT / SemiRES code -> a semires LAVT and its :class:`ModelSpec`.

The official ``train.py`` / ``train_semi_*.py`` save ``{'model': LAVT state dict,
'bert_model': BERT state dict (no pooler), 'optimizer', 'lr_scheduler', 'epoch', 'args':
argparse.Namespace}``; the ``lavt_one`` variant keeps BERT inside ``model`` as
``text_encoder.*`` and has no ``bert_model``. The file is read with ``weights_only`` loading
that allows ``argparse.Namespace`` and nothing else, so no pickled code runs.

The Swin geometry comes from the weights (embed width from the patch embedding, depths
from the block counts, heads from the position-bias tables' last dimension, the window from
their size), not from ``args.swin_type``; BERT's config and tokenizer from a
``save_pretrained`` folder. Official key -> semires key:

- ``backbone.patch_embed.*``, ``backbone.layers.i.blocks.*`` -> ``backbone.*`` unchanged;
- ``backbone.layers.i.downsample.*`` (end of stage i) -> ``backbone.layers.(i+1).downsample.*``;
- ``backbone.layers.i.fusion.*`` (PWAM, 1 x 1 Conv1d) -> ``fusion.i.*`` (Linear);
- ``backbone.layers.i.res_gate.*`` -> ``gates.i.mlp.*`` (stage 4's gate is never used: dropped);
- ``backbone.norm{i}.*`` -> ``norms.i.*``; ``classifier.*`` -> ``decoder.*``;
- ``bert_model`` (or ``text_encoder.*``) -> ``text.bert.*``.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.serialization import safe_globals
from transformers import BertConfig

from semires.errors import SemiresError
from semires.model.build import ModelConfig, ModelSpec, build_from_spec, check_config
from semires.model.lavt import LAVT
from semires.model.swin import SwinConfig
from semires.model.text import TextTokenizer, bert_config_from_dir

LAVT_DROP_PATH = 0.3  # the official model's stochastic depth (used only if training continues)
LAVT_MAX_TOKENS = 20

# The official PWAM's submodules -> semires' PixelWordAttention's
_PWAM = {
    "vis_project.0": "vis_proj.0",
    "image_lang_att.f_query.0": "query",
    "image_lang_att.f_key.0": "key",
    "image_lang_att.f_value.0": "value",
    "image_lang_att.W.0": "out",
    "project_mm.0": "mm_proj.0",
}
# The official decoder's layers -> semires' Decoder's (fuse.<scale>.<block>.<conv 0 | bn 1>)
_DECODER = {
    f"{kind}{block}_{scale}": f"fuse.{i}.{block - 1}.{0 if kind == 'conv' else 1}"
    for i, scale in enumerate((4, 3, 2))
    for block in (1, 2)
    for kind in ("conv", "bn")
}
_DECODER["conv1_1"] = "classifier"
# Buffers an official file may hold that the semires model recomputes
_DERIVED = re.compile(
    r"(relative_position_index|attn_mask|embeddings\.position_ids|embeddings\.token_type_ids)$"
)


@dataclass(frozen=True)
class OfficialCheckpoint:
    """The parts of an official checkpoint file that make the model."""

    path: Path
    model: dict[str, torch.Tensor]  # LAVT: backbone.*, classifier.*
    bert: dict[str, torch.Tensor]  # BERT, without the pooler
    layout: str  # "lavt" (BERT in 'bert_model') or "lavt_one" (BERT inside 'model')
    args: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None


@dataclass(frozen=True)
class Imported:
    """An official checkpoint converted: the spec, the model with its weights, what was dropped."""

    spec: ModelSpec
    model: LAVT
    source: OfficialCheckpoint
    dropped: list[str]


def read_official(path: str | Path) -> OfficialCheckpoint:
    """Read an official LAVT / SemiRES checkpoint without executing any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise SemiresError(f"{path}: official checkpoint not found; fix the path")
    try:
        with safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        name = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if name:
            raise SemiresError(
                f"{path}: refused to read this checkpoint: its pickle asks for {name[1]}; an official "
                "LAVT / SemiRES checkpoint holds only tensors, plain containers and argparse.Namespace, "
                "so this file was saved by other code: re-save its 'model' (and 'bert_model') state "
                "dicts alone"
            ) from e
        raise SemiresError(
            f"{path}: not a checkpoint ({_load_error(path)}); pass the .pth file that the official "
            "train.py saved (model_best_<id>.pth)"
        ) from e
    if not isinstance(obj, dict) or not _is_state_dict(obj.get("model")):
        got = sorted(map(str, obj))[:6] if isinstance(obj, dict) else type(obj).__name__
        raise SemiresError(
            f"{path}: not an official LAVT / SemiRES checkpoint (expected a dict with a 'model' state "
            f"dict, got {got}); pass the .pth file that the official train.py saved"
        )
    model = dict(obj["model"])
    text_keys = [k for k in model if k.startswith("text_encoder.")]
    if "bert_model" in obj:
        if not _is_state_dict(obj["bert_model"]):
            raise SemiresError(f"{path}: its 'bert_model' entry is not a state dict; the file is damaged")
        layout, bert = "lavt", dict(obj["bert_model"])
    elif text_keys:
        layout = "lavt_one"
        bert = {k.removeprefix("text_encoder."): model.pop(k) for k in text_keys}
    else:
        raise SemiresError(
            f"{path}: no BERT weights: neither a 'bert_model' entry nor text_encoder.* keys in 'model' "
            f"(it has {sorted(map(str, obj))}); pass the complete file the official train.py saved"
        )
    args = obj.get("args")
    args = dict(vars(args)) if isinstance(args, argparse.Namespace) else {}
    epoch = obj.get("epoch")
    return OfficialCheckpoint(path, model, bert, layout, args, epoch if isinstance(epoch, int) else None)


def _load_error(path: Path) -> str:
    if zipfile.is_zipfile(path):
        return "a torch.save archive that cannot be read: damaged or of another kind"
    return "not a file written by torch.save, or truncated"


def _is_state_dict(x: object) -> bool:
    return isinstance(x, Mapping) and bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())


def _shape(state: Mapping[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise SemiresError(
            f"{path}: weights of another architecture (no {key}); this is not an official LAVT / "
            "SemiRES checkpoint"
        )
    return tuple(state[key].shape)


def swin_geometry(ck: OfficialCheckpoint) -> SwinConfig:
    """Swin's embed width, depths, heads and window, read from the weights' shapes."""
    m, path = ck.model, ck.path
    patch = _shape(m, "backbone.patch_embed.proj.weight", path)
    if len(patch) != 4 or patch[1:] != (3, 4, 4):
        raise SemiresError(
            f"{path}: weights of another architecture (backbone.patch_embed.proj.weight is {list(patch)}, "
            "not a Swin 4 x 4 patch embedding)"
        )
    depths, heads, windows = [], [], set()
    for i in range(4):
        blocks = sorted({int(k.split(".")[4]) for k in m if k.startswith(f"backbone.layers.{i}.blocks.")})
        if not blocks or blocks != list(range(len(blocks))):
            raise SemiresError(
                f"{path}: weights of another architecture (backbone.layers.{i}.blocks.* missing or "
                "not numbered 0..n-1); expected LAVT's four Swin stages"
            )
        depths.append(len(blocks))
        stage_heads = set()
        for j in blocks:
            key = f"backbone.layers.{i}.blocks.{j}.attn.relative_position_bias_table"
            rows, nh = _table_shape(_shape(m, key, path), key, path)
            side = math.isqrt(rows)
            if side * side != rows or side % 2 == 0:
                raise SemiresError(
                    f"{path}: weights of another architecture ({key} has {rows} rows, not (2 window - 1)²)"
                )
            windows.add((side + 1) // 2)
            stage_heads.add(nh)
        if len(stage_heads) != 1:
            raise SemiresError(
                f"{path}: weights of another architecture (stage {i}'s blocks have different head "
                f"counts {sorted(stage_heads)})"
            )
        heads.append(stage_heads.pop())
    if len(windows) != 1:
        raise SemiresError(f"{path}: weights of another architecture (blocks of windows {sorted(windows)})")
    return SwinConfig(
        embed_dim=patch[0],
        depths=tuple(depths),  # type: ignore[arg-type]
        num_heads=tuple(heads),  # type: ignore[arg-type]
        window_size=windows.pop(),
        drop_path_rate=LAVT_DROP_PATH,
    )


def _table_shape(shape: tuple[int, ...], key: str, path: Path) -> tuple[int, int]:
    if len(shape) != 2:
        raise SemiresError(f"{path}: weights of another architecture ({key} is {list(shape)})")
    return shape[0], shape[1]


def pwam_heads(ck: OfficialCheckpoint, override: str | None = None) -> tuple[int, int, int, int]:
    """PWAM head counts: ``override`` or the file's ``args.mha`` (``a-b-c-d``; empty: one head each).

    The weights cannot tell (the heads split the same projections), so they come from the
    training arguments the file carries.
    """
    text = override if override is not None else str(ck.args.get("mha") or "")
    source = "--pwam-heads" if override is not None else f"{ck.path}: args.mha"
    if not text:
        return (1, 1, 1, 1)
    try:
        heads = tuple(int(h) for h in text.split("-"))
    except ValueError:
        heads = ()
    if len(heads) != 4 or min(heads) < 1:
        raise SemiresError(f"{source} = {text!r}: expected four positive head counts a-b-c-d, e.g. 1-1-1-1")
    return heads  # type: ignore[return-value]


def official_to_semires(key: str) -> str | None:
    """The semires LAVT key of an official LAVT key; None for weights LAVT computes but never uses."""
    m = re.fullmatch(r"backbone\.layers\.(\d+)\.(blocks\..+)", key)
    if m:
        return f"backbone.layers.{m[1]}.{m[2]}"
    m = re.fullmatch(r"backbone\.layers\.(\d+)\.downsample\.(.+)", key)
    if m:
        return f"backbone.layers.{int(m[1]) + 1}.downsample.{m[2]}"
    m = re.fullmatch(r"backbone\.layers\.(\d+)\.fusion\.(.+)\.(weight|bias)", key)
    if m and m[2] in _PWAM:
        return f"fusion.{m[1]}.{_PWAM[m[2]]}.{m[3]}"
    m = re.fullmatch(r"backbone\.layers\.(\d+)\.res_gate\.([02])\.weight", key)
    if m:
        return None if m[1] == "3" else f"gates.{m[1]}.mlp.{m[2]}.weight"
    m = re.fullmatch(r"backbone\.norm(\d+)\.(weight|bias)", key)
    if m:
        return f"norms.{m[1]}.{m[2]}"
    if key.startswith("backbone.patch_embed."):
        return key
    m = re.fullmatch(r"classifier\.(\w+)\.(\w+)", key)
    if m and m[1] in _DECODER:
        return f"decoder.{_DECODER[m[1]]}.{m[2]}"
    return "?"  # not LAVT's: the caller names it


@dataclass
class Converted:
    """The semires state dict of an official checkpoint, where each key came from, what was dropped."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # semires key -> official key
    dropped: list[str] = field(default_factory=list)


def convert_state(ck: OfficialCheckpoint) -> Converted:
    """Map every official key to its semires key (see the module's docstring)."""
    out = Converted()
    for key, value in ck.model.items():
        if _DERIVED.search(key):
            continue
        new = official_to_semires(key)
        if new == "?":
            raise SemiresError(
                f"{ck.path}: weights of another architecture ({key} is not a weight of LAVT); "
                "this is not an official LAVT / SemiRES checkpoint"
            )
        if new is None:
            out.dropped.append(key)
            continue
        if new.startswith("fusion.") and value.dim() == 3:  # a 1 x 1 Conv1d is a Linear
            if value.shape[-1] != 1:
                raise SemiresError(
                    f"{ck.path}: weights of another architecture ({key} is {list(value.shape)}, "
                    "not a 1 x 1 convolution)"
                )
            value = value[..., 0]
        out.state[new], out.origin[new] = value, key
    prefix = "text_encoder." if ck.layout == "lavt_one" else "bert_model: "
    for key, value in ck.bert.items():
        if _DERIVED.search(key):
            continue
        if key.startswith("pooler."):
            out.dropped.append(prefix + key)
            continue
        out.state[f"text.bert.{key}"], out.origin[f"text.bert.{key}"] = value, prefix + key
    return out


def _check_bert(ck: OfficialCheckpoint, bert_dir: Path, config: BertConfig, tokenizer: TextTokenizer) -> None:
    """BERT's folder must fit the weights: hidden size, vocabulary."""
    rows, width = _shape(ck.bert, "embeddings.word_embeddings.weight", ck.path)
    pwam_in = _shape(ck.model, "backbone.layers.0.fusion.image_lang_att.f_key.0.weight", ck.path)[1]
    for what, value in (("hidden size", width), ("PWAM's word width", pwam_in)):
        if config.hidden_size != value:
            raise SemiresError(
                f"{bert_dir}: BERT of hidden size {config.hidden_size}, but the checkpoint's {what} is "
                f"{value}; pass the BERT folder the model was trained with (e.g. bert-base-uncased)"
            )
    if config.vocab_size != rows or tokenizer.vocab_size != rows:
        raise SemiresError(
            f"{bert_dir}: a vocabulary of {tokenizer.vocab_size} tokens (config.json vocab_size "
            f"{config.vocab_size}), but the checkpoint's BERT embeds {rows}; pass the BERT folder the "
            "model was trained with (e.g. bert-base-uncased)"
        )


def import_official(
    path: str | Path, bert_dir: str | Path, *, image_size: int = 480, pwam_heads_override: str | None = None
) -> Imported:
    """An official checkpoint as a semires LAVT (weights loaded, eval mode) and its spec."""
    ck = read_official(path)
    bert_dir = Path(bert_dir)
    if not bert_dir.is_dir():
        raise SemiresError(
            f"{bert_dir}: BERT folder not found; pass the save_pretrained folder of the BERT the model "
            "was trained with (config.json and vocab.txt)"
        )
    swin = swin_geometry(ck)
    decoder_hidden = _shape(ck.model, "classifier.conv1_4.weight", ck.path)[0]
    config = ModelConfig(
        name="official",
        image_size=image_size,
        swin=swin,
        text=None,
        max_tokens=LAVT_MAX_TOKENS,
        decoder_hidden=decoder_hidden,
        pretrained=True,
        pwam_heads=pwam_heads(ck, pwam_heads_override),
        truncation="lavt",
    )
    check_config(config)
    bert_config = bert_config_from_dir(bert_dir)
    tokenizer = TextTokenizer.from_bert_dir(bert_dir)
    _check_bert(ck, bert_dir, bert_config, tokenizer)
    spec = ModelSpec(config, bert_config.to_json_string(), tokenizer.to_str())
    conv = convert_state(ck)
    model = build_from_spec(spec)
    state, own = conv.state, model.state_dict()
    extra = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if extra or missing or shape:
        if shape:
            k = shape[0]
            why = f"{conv.origin[k]} is {list(state[k].shape)}, the model needs {list(own[k].shape)}"
        elif missing:
            why = f"nothing in the file for {missing[0]}"
        else:
            why = f"{conv.origin[extra[0]]} has no place in the model"
        raise SemiresError(
            f"{ck.path}: weights of another architecture ({why}; {len(missing)} missing, "
            f"{len(extra)} unexpected, {len(shape)} of another shape, with the BERT config of {bert_dir})"
        )
    model.load_state_dict(state)
    return Imported(spec, model.eval(), ck, conv.dropped)


def label_percent(ck: OfficialCheckpoint) -> float | None:
    """The labeled share the file's args name (SemiRES's ``--sup_percent``), if any."""
    value = ck.args.get("sup_percent")
    try:
        pct = float(str(value).rstrip("%")) if value is not None else None
    except ValueError:
        return None
    return pct if pct is not None and 0 < pct <= 100 else None
