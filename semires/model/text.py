"""The sentence side: a WordPiece tokenizer and the BERT encoder (transformers).

The tokenizer is a ``tokenizers.Tokenizer`` carried as its JSON text, so a checkpoint holds
the exact ids it was trained with. It comes either from a local BERT directory
(``BertTokenizerFast.from_pretrained``; transformers 5's ``BertTokenizer(vocab_file=...)``
silently produces wrong ids) or is built from a corpus's words (:meth:`TextTokenizer.build_wordpiece`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizerFast

from semires.errors import SemiresError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# How a sentence longer than the token budget is cut:
#   lavt:     the first max_tokens ids of ``[CLS] words [SEP]`` (LAVT's ``encode(...)[:20]``;
#             a long sentence loses its [SEP])
#   keep_sep: the first max_tokens - 1 ids, then [SEP]
TRUNCATIONS = ("lavt", "keep_sep")


class TextTokenizer:
    """Sentences -> fixed-length token ids and attention mask (``[CLS] words [SEP] [PAD]...``)."""

    def __init__(self, tokenizer: Tokenizer, truncation: str = "lavt") -> None:
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation {truncation!r}: expected one of {', '.join(TRUNCATIONS)}")
        self._tok = tokenizer
        self.truncation = truncation
        pad = tokenizer.token_to_id("[PAD]")
        if pad is None:
            raise SemiresError("the tokenizer has no [PAD] token; it is not a BERT WordPiece tokenizer")
        self.pad_id = pad
        self._tok.no_padding()
        self._tok.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, sentences: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both ``B x max_tokens`` int64 (mask 1 on tokens, 0 on pads).

        Sentences longer than ``max_tokens`` (special tokens included) are cut as
        ``self.truncation`` says (:data:`TRUNCATIONS`).
        """
        ids = torch.full((len(sentences), max_tokens), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sentences), max_tokens), dtype=torch.long)
        for i, enc in enumerate(self._tok.encode_batch(list(sentences))):
            toks = enc.ids
            if len(toks) > max_tokens:
                toks = toks[:max_tokens] if self.truncation == "lavt" else [*toks[: max_tokens - 1], toks[-1]]
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return ids, mask

    def to_str(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_str(cls, text: str, truncation: str = "lavt") -> TextTokenizer:
        return cls(Tokenizer.from_str(text), truncation)

    @classmethod
    def from_bert_dir(cls, path: str | Path) -> TextTokenizer:
        """The tokenizer saved in a BERT directory (``vocab.txt`` or ``tokenizer.json``)."""
        path = Path(path)
        if not path.is_dir():
            raise SemiresError(
                f"{path}: BERT directory not found (model.bert_dir in params.yaml); save "
                "bert-base-uncased there with `save_pretrained` (model and tokenizer) and fix the path"
            )
        try:
            fast = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise SemiresError(f"{path}: no BERT tokenizer could be loaded from it ({e})") from e
        return cls(fast.backend_tokenizer)

    @classmethod
    def build_wordpiece(cls, corpus: Iterable[str], vocab_size: int = 1000) -> TextTokenizer:
        """A lower-casing BERT-style WordPiece tokenizer for ``corpus``, the same for the same words.

        The vocabulary: the special tokens, every character (alone and as a ``##`` suffix
        piece, so no word is unknown), then whole words by frequency (ties alphabetical) up to
        ``vocab_size``. (The ``tokenizers`` trainer breaks frequency ties differently from run
        to run, which would change ids between a run and its resume.)
        """
        normalizer = normalizers.BertNormalizer(lowercase=True)
        pre = pre_tokenizers.BertPreTokenizer()
        counts = Counter(w for s in corpus for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(s)))
        chars = sorted({c for w in counts for c in w})
        vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
        words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
        vocab += words[: max(0, vocab_size - len(vocab))]
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tok.decoder = decoders.WordPiece()
        return cls(tok)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a transformers tokenizer directory (loadable by ``BertTokenizerFast.from_pretrained``)."""
        fast = BertTokenizerFast(
            tokenizer_object=self._tok,
            unk_token="[UNK]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            mask_token="[MASK]",
        )
        fast.save_pretrained(str(path))


def bert_config_from_dir(path: str | Path) -> BertConfig:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SemiresError(
            f"{path}: no config.json, not a saved BERT (model.bert_dir in params.yaml); save "
            "bert-base-uncased there with `save_pretrained` and fix the path"
        )
    return BertConfig.from_pretrained(str(path), local_files_only=True)


def load_bert(path: str | Path) -> BertModel:
    """BERT weights from a local ``save_pretrained`` directory, no pooler, nothing fetched."""
    bert_config_from_dir(path)
    try:
        return BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError) as e:
        raise SemiresError(f"{Path(path)}: BERT weights could not be loaded ({e})") from e


class TextEncoder(nn.Module):
    """BERT's last hidden states as word features: ids, mask ``B x T`` -> ``B x T x C``.

    Pads are masked out of BERT's self-attention, so a real token's feature does not depend
    on how many pads follow it. BERT runs PyTorch's fused attention
    (``scaled_dot_product_attention``, transformers' ``sdpa``). The encoder hands BERT its
    attention mask ready made (:meth:`attention_mask_4d`), ``B x 1 x T x T`` as transformers
    would build it: transformers' own preparation first asks the device whether any token
    is a pad (to drop an all-ones mask), a host sync in every forward.
    """

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert
        if bert.config._attn_implementation != "sdpa":
            bert.set_attn_implementation("sdpa")

    @property
    def dim(self) -> int:
        return self.bert.config.hidden_size

    def attention_mask_4d(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``B x T`` (1 word, 0 pad) -> ``B x 1 x T x T``: boolean (True: attend) for ``sdpa``,
        else additive float32 (0, or the float's lowest value on pads), as transformers'
        ``sdpa_mask`` / ``eager_mask`` make them from a mask with pads."""
        b, t = attention_mask.shape
        keep = attention_mask.bool()[:, None, None, :].expand(b, 1, t, t)
        if self.bert.config._attn_implementation == "sdpa":
            return keep
        zero = torch.zeros((), dtype=torch.float32, device=keep.device)
        return torch.where(keep, zero, torch.finfo(torch.float32).min)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask_4d(attention_mask)
        return self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
