"""Model presets and the builders: a preset (+ local weights) -> :class:`ModelSpec` + :class:`LAVT`.

A :class:`ModelSpec` is everything needed to rebuild the same network and tokenizer without
the original weight files: the architecture, BERT's config and the tokenizer, all as plain
text and numbers, so it rides in a checkpoint read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import BertConfig, BertModel

from semires.errors import SemiresError
from semires.model.lavt import LAVT
from semires.model.swin import Swin, SwinConfig, create_swin, load_original_checkpoint
from semires.model.text import TRUNCATIONS, TextEncoder, TextTokenizer, bert_config_from_dir, load_bert


@dataclass(frozen=True)
class TextConfig:
    """A randomly initialised BERT (used when no BERT directory is given)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 1000  # upper bound for the WordPiece vocabulary built from the corpus
    dropout: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    """One LAVT architecture. ``pretrained`` presets load Swin and BERT from local files."""

    name: str
    image_size: int
    swin: SwinConfig
    text: TextConfig | None  # None: BERT (and its tokenizer) come from a local directory
    max_tokens: int = 20
    decoder_hidden: int | None = None  # None: the third stage's width, as LAVT
    pretrained: bool = False
    pwam_heads: tuple[int, int, int, int] = (1, 1, 1, 1)  # per stage; LAVT's --mha, the paper's 1-1-1-1
    truncation: str = "lavt"  # how long sentences are cut (semires.model.text.TRUNCATIONS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        sw = d["swin"]
        swin = SwinConfig(
            embed_dim=sw["embed_dim"],
            depths=tuple(sw["depths"]),
            num_heads=tuple(sw["num_heads"]),
            window_size=sw["window_size"],
            drop_path_rate=sw["drop_path_rate"],
        )
        text = TextConfig(**d["text"]) if d["text"] is not None else None
        rest = {k: v for k, v in d.items() if k not in ("swin", "text")}
        if "pwam_heads" in rest:
            rest["pwam_heads"] = tuple(rest["pwam_heads"])
        return cls(swin=swin, text=text, **rest)


PRESETS: dict[str, ModelConfig] = {
    # The paper's: Swin-B window 12 (ImageNet-22k), BERT-base uncased, 480 x 480.
    "paper": ModelConfig(
        name="paper",
        image_size=480,
        swin=SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
        text=None,
        pretrained=True,
    ),
    # The embedded default's: a small Swin and a small BERT, both trained from scratch.
    "tiny": ModelConfig(
        name="tiny",
        image_size=64,
        swin=SwinConfig(
            embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0
        ),
        text=TextConfig(dropout=0.0),  # a few hundred refs: dropout only slowed learning
        decoder_hidden=32,
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a trained model: architecture, BERT config (JSON) and tokenizer (JSON)."""

    config: ModelConfig
    bert_config: str
    tokenizer: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "bert_config": self.bert_config, "tokenizer": self.tokenizer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(ModelConfig.from_dict(d["config"]), d["bert_config"], d["tokenizer"])

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def make_tokenizer(self) -> TextTokenizer:
        """The tokenizer the model was trained with, cutting long sentences as its config says."""
        return TextTokenizer.from_str(self.tokenizer, self.config.truncation)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with top-level fields (e.g. ``image_size``) replaced."""
    if name not in PRESETS:
        raise SemiresError(f"model preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def check_config(config: ModelConfig) -> None:
    """A :class:`SemiresError` naming the first setting the network cannot be built with."""
    if config.image_size < 64 or config.image_size % 32:
        # Swin downsamples by 32 and PWAM's instance norm needs more than one pixel per stage.
        raise SemiresError(f"model image size {config.image_size}: expected a multiple of 32, at least 64")
    if config.truncation not in TRUNCATIONS:
        raise SemiresError(
            f"model truncation {config.truncation!r}: expected one of {', '.join(TRUNCATIONS)}"
        )
    for name, heads in (("Swin", config.swin.num_heads), ("PWAM", config.pwam_heads)):
        if len(heads) != 4 or any(h < 1 or d % h for d, h in zip(config.swin.dims, heads, strict=False)):
            raise SemiresError(
                f"model {name} heads {list(heads)}: expected four head counts dividing the stage widths "
                f"{list(config.swin.dims)}"
            )


def _assemble(config: ModelConfig, bert: BertModel, swin: Swin | None = None) -> LAVT:
    check_config(config)
    hidden = config.decoder_hidden or config.swin.dims[2]
    return LAVT(
        swin if swin is not None else create_swin(config.swin),
        TextEncoder(bert),
        config.swin.dims,
        decoder_hidden=hidden,
        pwam_heads=config.pwam_heads,
    )


def prepare(
    config: ModelConfig,
    *,
    swin_weights: str | Path | None = None,
    bert_dir: str | Path | None = None,
    corpus: Iterable[str] = (),
) -> tuple[ModelSpec, LAVT]:
    """A new model for training: pretrained weights loaded where the config asks for them.

    ``pretrained`` configs need ``swin_weights`` (an original Microsoft Swin checkpoint) and
    ``bert_dir`` (a ``save_pretrained`` BERT directory with its tokenizer). Otherwise Swin
    and BERT start random and the tokenizer is a WordPiece vocabulary built from ``corpus``.
    """
    if config.pretrained and (swin_weights is None or bert_dir is None):
        raise SemiresError(
            f"model preset {config.name!r} starts from pretrained weights: set model.swin_weights "
            "(swin_base_patch4_window12_384_22k.pth) and model.bert_dir (a saved bert-base-uncased)"
        )
    check_config(config)
    swin = create_swin(config.swin)
    if config.pretrained:
        load_original_checkpoint(swin, swin_weights)
        tokenizer = TextTokenizer.from_bert_dir(bert_dir)
        bert = load_bert(bert_dir)
        bert_config = bert_config_from_dir(bert_dir)
    else:
        assert config.text is not None
        corpus = list(corpus)
        if not corpus:
            raise SemiresError(
                f"model preset {config.name!r} builds its vocabulary from sentences; none given"
            )
        tokenizer = TextTokenizer.build_wordpiece(corpus, config.text.vocab_size)
        bert_config = small_bert_config(config, tokenizer.vocab_size)
        bert = BertModel(bert_config, add_pooling_layer=False)
    spec = ModelSpec(config, bert_config.to_json_string(), tokenizer.to_str())
    return spec, _assemble(config, bert, swin)


def small_bert_config(config: ModelConfig, vocab_size: int) -> BertConfig:
    t = config.text
    assert t is not None
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=max(64, config.max_tokens),
        hidden_dropout_prob=t.dropout,
        attention_probs_dropout_prob=t.dropout,
    )


def build_from_spec(spec: ModelSpec) -> LAVT:
    """The network described by ``spec``, randomly initialised (load a state dict into it)."""
    bert_config = BertConfig.from_dict(json.loads(spec.bert_config))
    return _assemble(spec.config, BertModel(bert_config, add_pooling_layer=False))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
