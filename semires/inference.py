"""Using a trained model: load any semires checkpoint, turn images and sentences into masks.

    from semires import load_model
    model = load_model("data/train_semi/cpi_pwa/5/model.pt")   # the EMA teacher by default
    mask = model.predict("photo.jpg", "the man in the red shirt on the left")   # H x W bool

A checkpoint holds one network (burn-in, the supervised control, an imported official model:
``"model"``) or two (a teacher-student run: ``"teacher"``, the EMA teacher that the official
code saves and evaluates, and ``"student"``). :func:`load_model` builds one of them,
:func:`load_networks` every one from a single read of the file.

Images are paths, PIL images or ``H x W x 3`` uint8 arrays; paths and PIL images are turned
upright by their EXIF orientation, so a mask fits the image as a viewer shows it. Each image
is resized to the model's input size as the datasets do (:func:`semires.data.resize_image`),
the sentence tokenized as in training (cut to the model's token limit), the batch run
through :func:`semires.logits.forward`, and the logits brought back to the image's own size
bilinearly before the argmax (:func:`semires.logits.summarize`). That last step is where
prediction differs from the evaluation protocol, which compares at the input size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from semires.data import resize_image
from semires.errors import SemiresError
from semires.images import MAX_PIXELS, DecodedImage, read_image
from semires.logits import difference, forward, summarize
from semires.model.build import ModelSpec, build_from_spec
from semires.train import load_checkpoint, state_dict_misfit

ImageInput = str | os.PathLike | Image.Image | np.ndarray
TEACHER, STUDENT, MODEL = "teacher", "student", "model"
# Images whose longer side is at least twice this are decoded reduced (the mask keeps the full size).
DECODE_SIDE = 1024
BATCH_SIZE = 16


@dataclass(frozen=True)
class Prediction:
    """One image + sentence: the mask at the image's own size and what to report about it.

    ``picture`` and ``picture_mask`` (only when asked for) are the decoded image and the mask
    at its size: the full image, or for a very large one a reduced copy (for an overlay).
    """

    mask: np.ndarray  # H x W bool, the image upright
    area: int
    bbox: tuple[int, int, int, int] | None  # x, y, width, height; None when the mask is empty
    score: float | None  # mean foreground probability inside the mask; None when empty
    truncated: bool  # the sentence had more tokens than the model reads
    seconds: float  # this request's decoding, its share of the batch's forward pass, upsampling
    picture: np.ndarray | None = None
    picture_mask: np.ndarray | None = None


class Segmenter:
    """One trained network and its tokenizer, ready to segment (built by :func:`load_model`)."""

    def __init__(
        self,
        network: nn.Module,
        spec: ModelSpec,
        *,
        weights: str,
        device: torch.device,
        step: int = 0,
        meta: dict[str, Any] | None = None,
        path: Path | None = None,
    ) -> None:
        self.network = network.to(device).eval()
        self.spec = spec
        self.weights = weights
        self.device = device
        self.step = step
        self.meta = dict(meta or {})
        self.path = path
        self.tokenizer = spec.make_tokenizer()

    @property
    def image_size(self) -> int:
        return self.spec.config.image_size

    @property
    def max_tokens(self) -> int:
        return self.spec.config.max_tokens

    def __repr__(self) -> str:
        where = f"{self.path}, " if self.path else ""
        return (
            f"Segmenter({where}{self.weights}, {self.spec.config.name} {self.image_size}px, on {self.device})"
        )

    def tokenize(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Token ids and attention mask ``B x T`` as training makes them, and which sentences
        were longer than ``T`` tokens (so cut)."""
        t = self.max_tokens
        _, longer = self.tokenizer.encode(sentences, t + 1)
        ids, mask = self.tokenizer.encode(sentences, t)
        return ids, mask, [bool(n > t) for n in longer.sum(1).tolist()]

    def logits(self, images: torch.Tensor, sentences: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """``images`` ``B x 3 x S x S`` in [0, 1] -> logits ``B x 2 x S x S`` float32 (on the
        model's device) and which sentences were cut."""
        ids, mask, truncated = self.tokenize(sentences)
        dev = self.device
        precision = "bf16" if dev.type == "cuda" else "fp32"  # prediction: bf16 where it is fast
        return forward(
            self.network, images.to(dev), ids.to(dev), mask.to(dev), precision=precision
        ), truncated

    def predict(self, image: ImageInput, sentence: str) -> np.ndarray:
        """The mask (``H x W`` bool, at the image's own size) of the object ``sentence`` names."""
        return self.predict_batch([image], [sentence])[0]

    def predict_batch(
        self, images: Sequence[ImageInput], sentences: Sequence[str], *, batch_size: int = BATCH_SIZE
    ) -> list[np.ndarray]:
        """:meth:`predict` for each pair, ``batch_size`` at a time through the network."""
        return [p.mask for p in self.segment(images, sentences, batch_size=batch_size)]

    def segment(
        self,
        images: Sequence[ImageInput],
        sentences: Sequence[str],
        *,
        batch_size: int = BATCH_SIZE,
        pictures: bool = False,
        max_pixels: int = MAX_PIXELS,
    ) -> Iterator[Prediction]:
        """A :class:`Prediction` per (image, sentence), in order, computed ``batch_size`` at a time.

        An image that appears in several requests in a row (paths compared as given) is decoded
        once. If an image cannot be read, the requests before it are still yielded, then the
        :class:`SemiresError` naming it is raised. ``pictures`` keeps the decoded image and
        the mask at its size in each prediction (for drawing an overlay).
        """
        if len(images) != len(sentences):
            raise SemiresError(
                f"{len(images)} images but {len(sentences)} sentences; give one sentence per image"
            )
        if batch_size < 1:
            raise SemiresError(f"batch size {batch_size}: expected at least 1")
        for i, s in enumerate(sentences):
            if not isinstance(s, str) or not s.strip():
                raise SemiresError(f"sentence {i + 1}: {s!r} is empty; give the words that name the object")
        cache: dict[Any, tuple[DecodedImage, torch.Tensor, float]] = {}
        for start in range(0, len(images), batch_size):
            keys = [_key(im) for im in images[start : start + batch_size]]
            cache = {k: v for k, v in cache.items() if k in keys}  # keep what this batch reuses
            failure = None
            for k, image in zip(keys, images[start : start + batch_size], strict=True):
                if k not in cache:
                    try:
                        cache[k] = self._prepare(image, start + keys.index(k), max_pixels)
                    except SemiresError as e:
                        failure = e
                        keys = keys[: keys.index(k)]
                        break
            if keys:
                yield from self._run([cache[k] for k in keys], sentences[start : start + len(keys)], pictures)
                cache = {k: (d, t, 0.0) for k, (d, t, _) in cache.items()}  # decoded: no time left to count
            if failure is not None:
                raise failure

    def _prepare(
        self, image: ImageInput, index: int, max_pixels: int
    ) -> tuple[DecodedImage, torch.Tensor, float]:
        t0 = time.perf_counter()
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
                raise SemiresError(
                    f"image {index + 1}: expected an H x W x 3 uint8 RGB array, got {image.dtype} of shape "
                    f"{image.shape}; convert it (e.g. np.asarray(pil_image.convert('RGB')))"
                )
            decoded = DecodedImage(rgb=image, size=image.shape[:2])
        elif isinstance(image, str | os.PathLike | Image.Image):
            decoded = read_image(image, max_side=DECODE_SIDE, max_pixels=max_pixels)
        else:
            raise SemiresError(
                f"image {index + 1}: a {type(image).__name__}; expected a path, a PIL image or an "
                "H x W x 3 uint8 array"
            )
        rgb = np.require(decoded.rgb, requirements=["C"])
        return decoded, resize_image(rgb, self.image_size), time.perf_counter() - t0

    def _run(
        self,
        prepared: list[tuple[DecodedImage, torch.Tensor, float]],
        sentences: Sequence[str],
        pictures: bool,
    ) -> Iterator[Prediction]:
        t0 = time.perf_counter()
        logits, truncated = self.logits(torch.stack([p[1] for p in prepared]), sentences)
        d = difference(logits)
        share = (time.perf_counter() - t0) / len(prepared)
        seen: set[int] = set()
        for k, (decoded, _, decode_s) in enumerate(prepared):
            t1 = time.perf_counter()
            s = summarize(d[k], decoded.size)
            picture = picture_mask = None
            if pictures:
                picture = decoded.rgb
                shape = decoded.rgb.shape[:2]
                picture_mask = s.mask if not decoded.reduced else summarize(d[k], shape).mask
            first = id(decoded) not in seen
            seen.add(id(decoded))
            yield Prediction(
                mask=s.mask,
                area=s.area,
                bbox=s.bbox,
                score=s.score,
                truncated=truncated[k],
                seconds=(decode_s if first else 0.0) + share + time.perf_counter() - t1,
                picture=picture,
                picture_mask=picture_mask,
            )


def _key(image: ImageInput) -> Any:
    """Requests with equal keys share one decoded image: a path as given, else the object."""
    return ("path", os.fspath(image)) if isinstance(image, str | os.PathLike) else ("object", id(image))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_networks(
    path: str | os.PathLike,
    *,
    weights: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Segmenter]:
    """The networks of the checkpoint at ``path`` (read once): all of them, ``{"teacher",
    "student"}`` for a teacher-student run and ``{"model"}`` otherwise, or those in ``weights``
    (``"teacher"`` and ``"student"`` only; None in it: the teacher when there is one, else the
    only network), on ``device`` (the GPU when there is one)."""
    for w in weights or ():
        if w not in (None, TEACHER, STUDENT):
            raise SemiresError(f"weights {w!r}: expected teacher, student, or none (the default)")
    path = Path(path)
    if path.is_dir():
        raise SemiresError(f"{path}: a folder, not a checkpoint; pass the model.pt file in it")
    ckpt = load_checkpoint(path)
    states = {TEACHER: ckpt.teacher, STUDENT: ckpt.model} if ckpt.teacher is not None else {MODEL: ckpt.model}
    names = list(states) if weights is None else [w or next(iter(states)) for w in weights]
    for name in names:
        if name not in states:
            raise SemiresError(
                f"{path}: has no {name}, only one network (a burn-in, control or imported model); "
                "load it without choosing teacher or student"
            )
    dev = torch.device(device) if device is not None else default_device()
    out = {}
    for name in dict.fromkeys(names):
        network = build_from_spec(ckpt.spec)
        misfit = state_dict_misfit(network, states[name])
        try:
            if misfit is None:
                network.load_state_dict(states[name])
        except RuntimeError as e:  # e.g. a tensor of another dtype than the model's
            misfit = str(e).strip().splitlines()[-1].strip()
        if misfit is not None:
            whose = "" if name == MODEL else f"{name} "
            raise SemiresError(
                f"{path}: {whose}weights do not fit the model the checkpoint describes ({misfit}); "
                "the file is damaged or was edited: delete it and retrain"
            )
        out[name] = Segmenter(
            network, ckpt.spec, weights=name, device=dev, step=ckpt.step, meta=ckpt.meta, path=path
        )
    return out


def load_model(
    path: str | os.PathLike, *, weights: str | None = None, device: str | torch.device | None = None
) -> Segmenter:
    """The trained model in the semires checkpoint at ``path``, on ``device`` (the GPU when
    there is one).

    ``weights``: ``"teacher"`` or ``"student"`` of a teacher-student checkpoint; None takes
    the teacher when there is one, else the checkpoint's only network.
    """
    (model,) = load_networks(path, weights=[weights], device=device).values()
    return model
