"""The Python API: load any checkpoint's network, images + sentences -> masks at the image's size."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from semires.data import ExpressionDataset
from semires.errors import SemiresError
from semires.inference import load_model, load_networks
from semires.model.build import prepare, preset
from semires.train import evaluate, save_checkpoint

from .conftest import REPO

LONG = (
    "the small red circle to the left of the big blue square that sits below the green triangle near the top"
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, synth_anns):
    """A teacher-student checkpoint (student and a different teacher) and a one-network one, tiny, random."""
    root = tmp_path_factory.mktemp("ckpt")
    corpus = [s for r in synth_anns.refs for s in r.sentences]
    torch.manual_seed(0)
    spec, student = prepare(preset("tiny"), corpus=corpus)
    teacher = prepare(preset("tiny"), corpus=corpus)[1]
    save_checkpoint(
        root / "ts.pt", spec=spec, model=student, step=7, teacher=teacher, meta={"stage": "train_semi"}
    )
    save_checkpoint(root / "one.pt", spec=spec, model=student, step=5, meta={"stage": "burn_in"})
    return root


@pytest.fixture(scope="module")
def model(checkpoints):
    """The teacher of the teacher-student checkpoint, on the CPU (loaded once: loading builds BERT)."""
    return load_model(checkpoints / "ts.pt", device="cpu")


@pytest.fixture(scope="module")
def photo(synth_root, synth_anns):
    """A val image of the synthetic set and one of its refs' sentences."""
    ref = synth_anns.in_split("val")[0]
    return synth_root / "images" / "synthref" / ref.file_name, ref.sentences[0]


def test_teacher_by_default_student_on_request(checkpoints, photo):
    teacher = load_model(checkpoints / "ts.pt")
    student = load_model(checkpoints / "ts.pt", weights="student")
    assert (teacher.weights, student.weights, teacher.step) == ("teacher", "student", 7)
    assert teacher.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    w_t = next(teacher.network.parameters())
    w_s = next(student.network.parameters())
    assert not torch.equal(w_t.cpu(), w_s.cpu())
    assert sorted(load_networks(checkpoints / "ts.pt")) == ["student", "teacher"]
    one = load_model(checkpoints / "one.pt")
    assert one.weights == "model" and torch.equal(next(one.network.parameters()).cpu(), w_s.cpu())
    with pytest.raises(SemiresError, match=r"one.pt: has no teacher, only one network"):
        load_model(checkpoints / "one.pt", weights="teacher")
    with pytest.raises(SemiresError, match=r"weights 'ema': expected teacher, student"):
        load_model(checkpoints / "ts.pt", weights="ema")


def test_mask_at_the_image_size_from_a_path_a_pil_image_or_an_array(model, photo):
    path, sentence = photo
    mask = model.predict(path, sentence)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
        assert mask.dtype == bool and mask.shape == (im.height, im.width)
        assert np.array_equal(model.predict(im, sentence), mask)
    assert np.array_equal(model.predict(rgb, sentence), mask)
    assert np.array_equal(model.predict(str(path), sentence), mask)


def test_prediction_equals_evaluation_at_the_original_resolution(checkpoints, synth_root, synth_anns):
    """One path: `evaluate` (resolution original) and predict make the same mask of each expression."""
    model = load_model(checkpoints / "one.pt", device="cpu")
    refs = synth_anns.in_split("val")[:6]
    images = synth_root / "images" / "synthref"
    data = ExpressionDataset(
        refs, images, model.tokenizer, image_size=model.image_size, max_tokens=model.max_tokens
    )
    ev = evaluate(model.network, data, device=torch.device("cpu"), batch_size=4, resolution="original")
    pairs = [(refs[r], s) for r, s in data.pairs]
    masks = model.predict_batch(
        [images / r.file_name for r, _ in pairs], [r.sentences[s] for r, s in pairs], batch_size=4
    )
    for (ref, _), mask, res in zip(pairs, masks, ev.results, strict=True):
        gt = ref.decode_mask().astype(bool)
        assert (int((mask & gt).sum()), int((mask | gt).sum())) == (res.inter, res.union)


def test_batch_size_and_repeated_images_do_not_change_masks(model, synth_root, synth_anns):
    refs = synth_anns.in_split("val")[:3]
    images = [synth_root / "images" / "synthref" / r.file_name for r in refs for _ in r.sentences]
    sentences = [s for r in refs for s in r.sentences]
    one = model.predict_batch(images, sentences, batch_size=1)
    many = model.predict_batch(images, sentences, batch_size=5)
    for a, b in zip(one, many, strict=True):
        assert a.shape == b.shape and (a == b).mean() > 0.999  # batched float sums may differ in the last bit
    preds = list(model.segment(images, sentences, batch_size=5))
    assert [p.seconds > 0 for p in preds] == [True] * len(preds)


def test_prediction_record_and_truncation(model, photo):
    path, sentence = photo
    short, long_ = model.segment([path, path], [sentence, LONG], pictures=True)
    assert not short.truncated and long_.truncated
    ids, _, cut = model.tokenize([LONG])
    assert cut == [True] and ids.shape == (1, model.max_tokens)
    for p in (short, long_):
        assert p.area == int(p.mask.sum())
        if p.area:
            x, y, w, h = p.bbox
            rows, cols = np.nonzero(p.mask)
            assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
            assert 0.5 < p.score <= 1.0  # the foreground is where the object's probability wins
        else:
            assert p.bbox is None and p.score is None
        assert p.picture.shape[:2] == p.picture_mask.shape == p.mask.shape  # a small image: not reduced


def test_exif_rotated_photo_gives_the_mask_of_the_upright_image(model, photo, tmp_path):
    path, sentence = photo
    with Image.open(path) as im:
        upright = im.convert("RGB")
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned left; shown turned right, i.e. upright
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    rotated = model.predict(tmp_path / "phone.png", sentence)
    assert rotated.shape == (upright.height, upright.width)
    assert np.array_equal(rotated, model.predict(tmp_path / "upright.png", sentence))


def test_bad_inputs_are_one_clear_message(model, photo, tmp_path):
    path, sentence = photo
    cases = [
        (lambda: model.predict(path, "  "), r"sentence 1: '  ' is empty; give the words"),
        (
            lambda: model.predict(np.zeros((4, 4, 3), np.float32), sentence),
            r"image 1: expected an H x W x 3 uint8",
        ),
        (lambda: model.predict(np.zeros((4, 4), np.uint8), sentence), r"got uint8 of shape \(4, 4\)"),
        (lambda: model.predict(42, sentence), r"image 1: a int; expected a path, a PIL image"),
        (lambda: model.predict_batch([path], [sentence, sentence]), r"1 images but 2 sentences"),
        (lambda: model.predict(tmp_path / "none.jpg", sentence), r"none.jpg: image not found"),
        (lambda: load_model(tmp_path), r"a folder, not a checkpoint; pass the model.pt"),
    ]
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    cases.append((lambda: load_model(tmp_path / "junk.pt"), r"junk.pt: not a readable checkpoint"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    cases.append((lambda: load_model(tmp_path / "other.pt"), r"other.pt: not a semires LAVT checkpoint"))
    for call, message in cases:
        with pytest.raises(SemiresError, match=message):
            call()


def test_requests_before_an_unreadable_image_are_still_yielded(model, photo, tmp_path):
    path, sentence = photo
    (tmp_path / "bad.jpg").write_bytes(b"")
    got = []
    with pytest.raises(SemiresError, match=r"bad.jpg: empty file \(0 bytes\)"):
        for p in model.segment([path, path, tmp_path / "bad.jpg", path], [sentence] * 4, batch_size=4):
            got.append(p)
    assert len(got) == 2


def test_import_semires_is_cheap():
    """No torch, no model code, no file read until load_model is used."""
    code = (
        "import sys, semires; print(sorted(m for m in ('torch', 'PIL', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from semires import annotations
    from semires import load_model as api

    assert api is load_model and annotations.__name__ == "semires.annotations"  # submodules still import
