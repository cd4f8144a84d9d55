import itertools
import json
from pathlib import Path

import pytest

from semires.annotations import Annotations, RefRecord
from semires.errors import SemiresError
from semires.split import check_nested, num_labeled, random_split, split_from_file

PAPER_1PCT = Path(__file__).parent / "data" / "refcoco_1pct_image_train.json"


def test_smaller_fraction_is_subset_of_larger():
    ids = range(1000, 1500)
    splits = [random_split(ids, p, seed=7) for p in (0.5, 1, 2, 5, 10, 100)]
    check_nested(splits)
    for a, b in itertools.pairwise(splits):
        assert set(a.labeled) < set(b.labeled)
    assert [len(s.labeled) for s in splits] == [3, 5, 10, 25, 50, 500]
    for s in splits:
        assert set(s.labeled).isdisjoint(s.unlabeled)
        assert set(s.labeled) | set(s.unlabeled) == set(ids)


def test_seeded_and_deterministic():
    a = random_split(range(200), 10, seed=0)
    assert a == random_split(reversed(range(200)), 10, seed=0)
    assert a.labeled != random_split(range(200), 10, seed=1).labeled


@pytest.mark.parametrize("pct", [0, -1, 100.5, 1000])
def test_fraction_outside_range(pct):
    with pytest.raises(SemiresError, match=r"outside \(0, 100\]"):
        num_labeled(100, pct)


def test_at_least_one_labeled_image():
    assert num_labeled(50, 0.1) == 1


def test_split_by_image_counts_every_ref(synth_anns):
    s = random_split(synth_anns.image_ids("train"), 25, seed=0)
    doc = s.to_json(synth_anns)
    train = synth_anns.counts(synth_anns.in_split("train"))
    lab, unl = doc["counts"]["labeled"], doc["counts"]["unlabeled"]
    assert lab["images"] + unl["images"] == train.images
    assert lab["refs"] + unl["refs"] == train.refs
    assert lab["sentences"] + unl["sentences"] == train.sentences


def _anns_holding(entries, extra_train_images):
    """Annotations whose train split holds the images of a SemiRES split file plus others."""
    refs = []
    for e in entries:
        refs.append(
            RefRecord(
                ref_id=e["mask_id"],
                ann_id=e["mask_id"],
                image_id=e["iid"],
                file_name=f"{e['iid']}.jpg",
                height=10,
                width=10,
                split="train",
                category_id=e["cat_id"],
                bbox=tuple(e["bbox"]),
                sentences=tuple(e["refs"]),
                sent_ids=tuple(range(len(e["refs"]))),
                mask={"size": [10, 10], "counts": "PP1"},
            )
        )
    for k, iid in enumerate(extra_train_images):
        refs.append(
            RefRecord(
                ref_id=10**7 + k,
                ann_id=10**7 + k,
                image_id=iid,
                file_name=f"{iid}.jpg",
                height=10,
                width=10,
                split="train",
                category_id=1,
                bbox=(0, 0, 1, 1),
                sentences=("a thing",),
                sent_ids=(0,),
                mask={"size": [10, 10], "counts": "PP1"},
            )
        )
    return Annotations("refcoco", "unc", refs)


def test_the_papers_own_refcoco_1pct_labeled_images():
    obj = json.loads(PAPER_1PCT.read_text())
    anns = _anns_holding(obj["train"], extra_train_images=range(1, 1001))
    s = split_from_file(obj, anns, 1, name=PAPER_1PCT.name)
    counts = s.to_json(anns)["counts"]["labeled"]
    # the published file: 432 objects on 169 images, 1,222 sentences
    assert counts == {"images": 169, "refs": 432, "sentences": 1222}
    assert len(s.unlabeled) == 1000 and s.seed is None and s.source == PAPER_1PCT.name


def test_split_file_from_another_dataset():
    obj = json.loads(PAPER_1PCT.read_text())
    anns = _anns_holding(obj["train"][:10], extra_train_images=range(1, 50))
    with pytest.raises(SemiresError, match="are not train images of refcoco"):
        split_from_file(obj, anns, 1, name="x.json")


@pytest.mark.parametrize("obj", [[], {"train": []}, {"val": [{"iid": 1}]}, {"train": [{"mask_id": 3}]}])
def test_not_a_split_file(obj):
    with pytest.raises(SemiresError, match="SemiRES/SimREC split file"):
        split_from_file(obj, _anns_holding([], [1, 2]), 1, name="x.json")
