"""Token ids of real RefCOCO sentences: LAVT's ``tokenizer.encode(s, add_special_tokens=True)[:20]``,
padded with 0 (a long sentence loses its [SEP]).

tests/data/refcoco_sentences.json: the 60 longest sentences of the SemiRES 1 % split file
(train, val, testA, testB) and 240 others; the reference ids come from transformers' own
tokenizer loading the same folder, cut and padded as LAVT's dataset does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast

from semires.model.text import TextTokenizer

DATA = Path(__file__).parent / "data"
SENTENCES = json.loads((DATA / "refcoco_sentences.json").read_text(encoding="utf-8"))["sentences"]
MAX_TOKENS = 20


def lavt_ids(tokenizer: BertTokenizerFast, sentence: str) -> tuple[list[int], list[int]]:
    """LAVT's dataset: ``encode(add_special_tokens=True)[:max_tokens]``, 0-padded; mask 1 on ids."""
    ids = tokenizer.encode(sentence, add_special_tokens=True)[:MAX_TOKENS]
    return ids + [0] * (MAX_TOKENS - len(ids)), [1] * len(ids) + [0] * (MAX_TOKENS - len(ids))


@pytest.fixture(scope="module", params=["corpus WordPiece, 400 tokens", "golden BERT folder"])
def bert_folder(request, tmp_path_factory) -> Path:
    """A small vocabulary splits rare words into pieces, so many sentences pass 20 tokens."""
    if request.param == "golden BERT folder":
        return DATA / "lavt_official" / "bert"
    path = tmp_path_factory.mktemp("bert")
    TextTokenizer.build_wordpiece(SENTENCES, 400).save_pretrained(path)
    return path


def test_ids_are_lavts_for_real_sentences(bert_folder):
    reference = BertTokenizerFast.from_pretrained(str(bert_folder), local_files_only=True)
    ours = TextTokenizer.from_bert_dir(bert_folder)
    assert ours.truncation == "lavt"
    ids, mask = ours.encode(SENTENCES, MAX_TOKENS)
    want = [lavt_ids(reference, s) for s in SENTENCES]
    assert ids.tolist() == [w[0] for w in want]
    assert mask.tolist() == [w[1] for w in want]
    # The cut is exercised: some sentences are longer than 20 tokens and end without [SEP].
    full = [len(reference.encode(s)) for s in SENTENCES]
    cut = [i for i, n in enumerate(full) if n > MAX_TOKENS]
    assert len(cut) >= 5, max(full)
    sep = reference.sep_token_id
    assert all(ids[i, -1] != sep and mask[i].all() for i in cut)
    assert all(ids[i, full[i] - 1] == sep for i, n in enumerate(full) if n <= MAX_TOKENS)


def test_keep_sep_mode_ends_every_cut_sentence_with_sep(bert_folder):
    ours = TextTokenizer(TextTokenizer.from_bert_dir(bert_folder)._tok, truncation="keep_sep")
    lavt, _ = TextTokenizer.from_bert_dir(bert_folder).encode(SENTENCES, MAX_TOKENS)
    ids, mask = ours.encode(SENTENCES, MAX_TOKENS)
    sep = ours._tok.token_to_id("[SEP]")
    long_rows = mask.all(1) & (lavt[:, -1] != sep)
    assert long_rows.any()
    assert (ids[long_rows, -1] == sep).all()
    assert torch.equal(ids[long_rows, :-1], lavt[long_rows, :-1])
    assert torch.equal(ids[~long_rows], lavt[~long_rows])
