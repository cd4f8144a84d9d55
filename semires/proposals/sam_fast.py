"""SAM's automatic mask generation with the post-processing on the model's device.

:class:`FastMaskGenerator` returns the masks of segment-anything's
``SamAutomaticMaskGenerator.generate`` (``binary_mask`` records, as :class:`Proposals`) for
the same model and settings, but spends its time differently. The library, for every batch
of ``points_per_batch`` points, upsamples all ``3 x points_per_batch`` mask logits to the
image size, scores and thresholds them, then run-length encodes every surviving mask with a
host round trip per mask (before box NMS, so most of those masks are then thrown away), and
finally decodes the kept run lengths into masks on the host with a Python loop per run.
Here:

* the decoder runs over the batches without waiting for the host (the same batches, so
  the same arithmetic: a different batch size changes float32 results on some backends);
* the predicted-IoU threshold is applied to the low-resolution logits, so only masks that
  pass it are upsampled (the threshold is per mask, the upsampling per mask: the same set);
* stability score, thresholds, boxes and the crop-edge test run on the device over chunks
  of at most ``3 x points_per_batch`` masks (the library's peak), using segment-anything's
  own tensor functions, and keep only scores and boxes;
* box NMS (torchvision's ``batched_nms``, as the library) picks the kept masks, whose
  logits are upsampled again (the same operation on the same input) and thresholded;
* the kept masks and their scores, areas and boxes reach the host in one transfer.

In float32 the output equals the library's bit for bit (tested on the CPU). The model's
precision and attention are set up by :func:`semires.proposals.sam.sam_generator`;
``min_mask_region_area > 0`` (OpenCV hole filling on the host) is left to the library.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from semires.proposals.base import Proposals


def _rel_pos(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """``size x size x d``: the relative-position embedding of query row ``i`` and key row
    ``j`` (``rel_pos[i - j + size - 1]``), as segment-anything's ``get_rel_pos`` for equal
    query and key sizes, with the index made on the embedding's device (no host tensor
    inside a compiled graph). Tables of another length are resized by the library's own
    function."""
    if rel_pos.shape[0] != 2 * size - 1:
        from segment_anything.modeling.image_encoder import get_rel_pos

        return get_rel_pos(size, size, rel_pos)
    r = torch.arange(size, device=rel_pos.device)
    return rel_pos[r[:, None] - r[None, :] + (size - 1)]


def sdpa_attention(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of segment-anything's image-encoder ``Attention`` through
    ``F.scaled_dot_product_attention``: the same function (softmax of scaled ``q k^T`` plus
    the decomposed relative-position terms, times ``v``), computed by a fused kernel.

    ``x``: ``B x H x W x C`` -> ``B x H x W x C``. The relative-position terms become the
    additive ``attn_mask`` (``B x heads x HW x HW``); they use the unscaled queries, as
    the library does."""
    b, h, w, _ = x.shape
    heads = module.num_heads
    qkv = module.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # B x heads x HW x d
    bias = None
    if module.use_rel_pos:
        rq = q.reshape(b, heads, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, _rel_pos(module.rel_pos_h, h).to(q.dtype))  # .. x H
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, _rel_pos(module.rel_pos_w, w).to(q.dtype))  # .. x W
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=module.scale)
    return module.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def use_sdpa(image_encoder: torch.nn.Module) -> int:
    """Route every attention of a SAM ``ImageEncoderViT`` through :func:`sdpa_attention`;
    returns how many were switched."""
    from segment_anything.modeling.image_encoder import Attention

    n = 0
    for m in image_encoder.modules():
        if isinstance(m, Attention):
            m.forward = sdpa_attention.__get__(m)  # bound: m.forward(x) -> sdpa_attention(m, x)
            n += 1
    return n


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@dataclass(frozen=True)
class Candidates:
    """Every mask the decoder proposes for one crop, before any threshold (``M = 3 x points``,
    point-major): ``predicted_iou`` and ``stability_score`` (``M`` float32), ``boxes``
    (``M x 4`` int64, XYXY in the crop's frame, zeros for an empty mask) and ``near_edge``
    (``M`` bool: the box touches a crop edge that is not an image edge; such masks are
    dropped). All on the model's device."""

    predicted_iou: torch.Tensor
    stability_score: torch.Tensor
    boxes: torch.Tensor
    near_edge: torch.Tensor


@dataclass
class _Crop:
    """One crop's decoder output: ``low_res`` ``M x h x w`` logits (the decoder's dtype),
    ``iou`` ``M`` float32, and the sizes ``postprocess_masks`` needs."""

    box: list[int]
    low_res: torch.Tensor
    iou: torch.Tensor
    input_size: tuple[int, int]
    size: tuple[int, int]


class FastMaskGenerator:
    """``generator(image) -> Proposals``: the masks of ``SamAutomaticMaskGenerator(model,
    **settings).generate(image)`` with the post-processing on ``model``'s device.

    ``settings``: a :class:`semires.proposals.sam.SamSettings` (or any object with its
    fields) with ``min_mask_region_area == 0``."""

    def __init__(self, model: torch.nn.Module, settings: Any) -> None:
        from segment_anything import SamPredictor
        from segment_anything.utils.amg import build_all_layer_point_grids

        if settings.min_mask_region_area > 0:
            raise ValueError("FastMaskGenerator: min_mask_region_area > 0 needs the library's generator")
        self.model = model
        self.settings = settings
        self.predictor = SamPredictor(model)
        self.point_grids = build_all_layer_point_grids(
            settings.points_per_side, settings.crop_n_layers, settings.crop_n_points_downscale_factor
        )

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    # --- the model ------------------------------------------------------------------------

    def _decode(self, image: np.ndarray, crop_box: list[int], layer: int) -> _Crop:
        """Embed one crop of ``image`` (``H x W x 3`` uint8) and decode its point grid in
        batches of ``points_per_batch``, the library's batches, with no host sync between them."""
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        size = crop.shape[:2]
        self.predictor.set_image(crop)
        model, predictor = self.model, self.predictor
        points = self.point_grids[layer] * np.array(size)[None, ::-1]
        pe = model.prompt_encoder.get_dense_pe()
        # float64 coordinates, as the library passes them (the prompt encoder scales them in
        # float64 before its float32 Fourier features); one copy to the device for all batches
        every = torch.as_tensor(predictor.transform.apply_coords(points, size), device=self.device)
        labels = torch.ones(len(points), dtype=torch.int, device=self.device)
        low, iou = [], []
        for part in _chunks(len(points), self.settings.points_per_batch):
            coords = every[part]
            sparse, dense = model.prompt_encoder(
                points=(coords[:, None, :], labels[part, None]), boxes=None, masks=None
            )
            masks, scores = model.mask_decoder(
                image_embeddings=predictor.features,
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            low.append(masks.flatten(0, 1))
            iou.append(scores.flatten(0, 1))
        out = _Crop(crop_box, torch.cat(low), torch.cat(iou).float(), predictor.input_size, size)
        predictor.reset_image()
        return out

    def _logits(self, c: _Crop, index: torch.Tensor) -> torch.Tensor:
        """Mask logits of masks ``index`` at the crop's size: ``K x h x w`` float32, as the
        library's ``postprocess_masks`` makes them (each mask its own plane)."""
        low = c.low_res[index].float()[:, None]
        return self.model.postprocess_masks(low, c.input_size, c.size)[:, 0]

    # --- post-processing -------------------------------------------------------------------

    def _score(self, c: _Crop, index: torch.Tensor, image_size: tuple[int, int]) -> Candidates:
        """Stability score, box and crop-edge test of masks ``index`` (``K`` int64), in
        chunks of at most ``3 x points_per_batch`` masks; the logits are not kept."""
        from segment_anything.utils.amg import (
            batched_mask_to_box,
            calculate_stability_score,
            is_box_near_crop_edge,
        )

        thr = self.model.mask_threshold
        h, w = image_size
        stab, boxes, near = [], [], []
        for part in _chunks(len(index), 3 * self.settings.points_per_batch):
            logits = self._logits(c, index[part])
            stab.append(calculate_stability_score(logits, thr, self.settings.stability_score_offset))
            b = batched_mask_to_box(logits > thr)
            boxes.append(b)
            near.append(is_box_near_crop_edge(b, c.box, [0, 0, w, h]))
        if not stab:
            empty = torch.zeros(0, device=self.device)
            return Candidates(
                c.iou[index], empty, torch.zeros(0, 4, dtype=torch.long, device=self.device), empty.bool()
            )
        return Candidates(c.iou[index], torch.cat(stab), torch.cat(boxes), torch.cat(near))

    def candidates(self, image: np.ndarray) -> Candidates:
        """Every mask of the whole-image crop, scored but not filtered (for choosing
        thresholds: the generator keeps those with ``predicted_iou > pred_iou_thresh`` and
        ``stability_score >= stability_score_thresh`` (each test only when its threshold is
        above 0) and not ``near_edge``, then box NMS)."""
        c = self._decode(image, [0, 0, image.shape[1], image.shape[0]], 0)
        return self._score(c, torch.arange(len(c.iou), device=self.device), image.shape[:2])

    def _crop_masks(self, image: np.ndarray, crop_box: list[int], layer: int) -> dict[str, torch.Tensor]:
        """One crop's kept masks, as the library's ``_process_crop`` keeps them (its order):
        ``masks`` ``K x H x W`` bool in the image's frame, ``iou``, ``stability`` (float32),
        ``boxes`` ``K x 4`` int64 XYXY in the image's frame."""
        from segment_anything.utils.amg import uncrop_boxes_xyxy, uncrop_masks
        from torchvision.ops.boxes import batched_nms

        s = self.settings
        h, w = image.shape[:2]
        c = self._decode(image, crop_box, layer)
        if s.pred_iou_thresh > 0.0:  # the library tests a threshold only when it is above 0
            index = torch.nonzero(c.iou > s.pred_iou_thresh)[:, 0]
        else:
            index = torch.arange(len(c.iou), device=self.device)
        cand = self._score(c, index, (h, w))
        keep = ~cand.near_edge
        if s.stability_score_thresh > 0.0:
            keep &= cand.stability_score >= s.stability_score_thresh
        sel = torch.nonzero(keep)[:, 0]
        boxes = cand.boxes[sel]
        by_nms = sel[
            batched_nms(boxes.float(), cand.predicted_iou[sel], torch.zeros_like(sel), s.box_nms_thresh)
        ]
        masks = [
            self._logits(c, index[by_nms][part]) > self.model.mask_threshold
            for part in _chunks(len(by_nms), 3 * s.points_per_batch)
        ]
        masks = torch.cat(masks) if masks else torch.zeros(0, *c.size, dtype=torch.bool, device=self.device)
        return {
            "masks": uncrop_masks(masks, crop_box, h, w),
            "iou": cand.predicted_iou[by_nms],
            "stability": cand.stability_score[by_nms],
            "boxes": uncrop_boxes_xyxy(cand.boxes[by_nms], crop_box),
            "crop_boxes": torch.tensor(crop_box, device=self.device).expand(len(by_nms), 4),
        }

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> Proposals:
        """``image``: ``H x W x 3`` uint8 RGB -> its masks and their scores, areas and boxes."""
        from segment_anything.utils.amg import generate_crop_boxes
        from torchvision.ops.boxes import batched_nms, box_area

        s = self.settings
        h, w = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes((h, w), s.crop_n_layers, s.crop_overlap_ratio)
        parts = [self._crop_masks(image, box, layer) for box, layer in zip(crop_boxes, layers, strict=True)]
        kept = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if len(crop_boxes) > 1:  # duplicates between crops: prefer the smaller crop, as the library
            scores = 1 / box_area(kept["crop_boxes"])
            order = batched_nms(
                kept["boxes"].float(), scores, torch.zeros_like(scores, dtype=torch.long), s.crop_nms_thresh
            )
            kept = {k: v[order] for k, v in kept.items()}
        return _to_host(kept, (h, w))


def _to_host(kept: dict[str, torch.Tensor], size: tuple[int, int]) -> Proposals:
    """The kept masks and their attributes -> :class:`Proposals`, in one device-to-host copy."""
    masks = kept["masks"]
    n = masks.shape[0]
    if n == 0:
        return Proposals.from_masks(np.zeros((0, *size), bool))
    x0, y0, x1, y1 = kept["boxes"].unbind(1)
    attrs = torch.stack(
        [
            kept["iou"],
            kept["stability"],
            masks.sum((1, 2)).float(),
            x0.float(),
            y0.float(),
            (x1 - x0).float(),
            (y1 - y0).float(),
        ],
        dim=1,
    )  # N x 7 float32, ATTR_FIELDS' order
    flat = torch.cat([attrs.contiguous().view(torch.uint8).reshape(-1), masks.view(torch.uint8).reshape(-1)])
    host = flat.to("cpu", non_blocking=True)  # from a GPU: into pinned memory, a faster copy
    if flat.is_cuda:
        torch.cuda.current_stream(flat.device).synchronize()  # the copy has landed
    host = host.numpy()
    a = host[: attrs.numel() * 4].view(np.float32).reshape(n, 7)
    return Proposals(
        masks=host[attrs.numel() * 4 :].view(bool).reshape(n, *size),
        predicted_iou=a[:, 0].copy(),
        stability_score=a[:, 1].copy(),
        area=a[:, 2].copy(),
        bbox=a[:, 3:].copy(),
    )


@dataclass(frozen=True)
class MaskAgreement:
    """How two mask sets of one image agree: masks paired one to one, greedily by descending
    IoU (pairs with IoU > 0 only). ``identical``: pairs with the very same pixels;
    ``differ``: masks of the larger set without an identical partner; ``mean_iou`` and
    ``min_iou`` over the pairs (0 without pairs)."""

    count_a: int
    count_b: int
    pairs: int
    identical: int
    differ: int
    mean_iou: float
    min_iou: float


def compare_masks(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> MaskAgreement:
    """``a``: ``N x H x W``, ``b``: ``M x H x W`` bool (on any one device) ->
    :class:`MaskAgreement`. The ``N x M`` intersections are one float64 matrix product
    (exact, whatever the float32 matmul precision); the pairing runs on the host."""
    a = torch.as_tensor(a).flatten(1).double()
    b = torch.as_tensor(b).flatten(1).double()
    n, m = a.shape[0], b.shape[0]
    inter = (a @ b.T).cpu().numpy().astype(np.int64)  # N x M
    union = (
        a.sum(1).cpu().numpy().astype(np.int64)[:, None]
        + b.sum(1).cpu().numpy().astype(np.int64)[None, :]
        - inter
    )
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # two empty masks: identical
    used_a, used_b = np.zeros(n, bool), np.zeros(m, bool)
    paired: list[float] = []
    identical = 0
    for k in np.argsort(-iou, axis=None, kind="stable"):
        i, j = divmod(int(k), m)
        if iou[i, j] <= 0 or len(paired) == min(n, m):
            break
        if used_a[i] or used_b[j]:
            continue
        used_a[i] = used_b[j] = True
        paired.append(float(iou[i, j]))
        identical += bool(inter[i, j] == union[i, j])
    return MaskAgreement(
        count_a=n,
        count_b=m,
        pairs=len(paired),
        identical=identical,
        differ=max(n, m) - identical,
        mean_iou=float(np.mean(paired)) if paired else 0.0,
        min_iou=float(np.min(paired)) if paired else 0.0,
    )
