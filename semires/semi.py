"""Teacher-student training on unlabeled images with SAM-refined pseudo-labels.

Per step: the EMA teacher labels a batch of unlabeled expressions from their *weak* view
(resized, maybe flipped); :func:`semires.refine.refine` repairs the labels with the image's
proposals, moved by the same flip; the student learns from the labeled batch and, on the
*strong* view (the weak one plus colour jitter, applied to the raw image before the
model normalises it), from the repaired labels::

    loss = sup_weight * supervised + unsup_weight * unsupervised

and the teacher moves towards the student (:func:`semires.ema.ema_update`). The terms add
up as the public teacher-student scripts do: the supervised term is the class-weighted
cross-entropy, plain mean over the pixels (:func:`pixel_mean_loss`); the unsupervised one
(:func:`unsupervised_loss`) gives matched samples the same loss on their refined label and
unmatched ones the unweighted cross-entropy times their PWA weights, each group a plain
mean over its pixels, the two halved when both are present. Counts stay tensors: nothing
reads back to the host inside a step.

The hidden ground truth of the unlabeled expressions rides along for diagnostics only
(:func:`pseudo_label_quality`, the per-step pseudo-label IoU); no loss ever reads it.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from semires import distributed
from semires.annotations import RefRecord
from semires.blur import gaussian_blur
from semires.data import (
    ColourJitter,
    DeferredMasks,
    ExpressionDataset,
    Sample,
    StepSampler,
    Transform,
    View,
    make_loader,
    packed_tensor,
    start_workers,
    to_unit,
)
from semires.ema import ema_update
from semires.errors import SemiresError
from semires.metrics import intersection_union, iou
from semires.model.build import ModelSpec
from semires.model.speed import speed_up
from semires.model.text import TextTokenizer
from semires.proposals.store import ProposalStore
from semires.refine import RefineConfig, Refined, refine
from semires.resize import NearestRule
from semires.syncs import host_values
from semires.train import (
    BestOnVal,
    Evaluation,
    LoopConfig,
    LoopResult,
    NonFiniteWatch,
    autocast,
    class_weight_tensor,
    eval_loader,
    evaluate,
    gather_objects,
    keep_best,
    load_checkpoint,
    make_optimizer,
    poly_schedule,
    restore,
    rng_state,
    save_checkpoint,
    stop_all,
    to_device,
    training_mode,
    unwrap,
)

# --- data ----------------------------------------------------------------------------------


class UnlabeledSample(NamedTuple):
    """One unlabeled expression (batched by :func:`collate_unlabeled`: a leading ``B``).

    The image's proposals at the input size ``S`` travel bit-packed (:mod:`semires.bits`)
    and by their nonempty rows, a few percent of the whole: ``proposals`` holds those rows,
    ``R x S/8`` uint8, and ``proposal_rows`` (``R`` int64) where each goes in the ``N x S``
    rows of the sample's masks, or in a batch in the ``B x Nmax x S`` rows of the batch's
    (padded with empty masks, ``valid``, ``B x Nmax``, marking the real ones).
    :func:`unlabeled_to_device` lays them out on the device as ``B x Nmax x S x S/8``
    (``proposal_rows`` None), which :func:`semires.refine.refine` unpacks chunk by chunk.

    The images travel the same way, small: the weak view as uint8 pixels with the radius of
    its blur, the strong view as the numbers of its colour jitter; :func:`unlabeled_to_device`
    makes both [0, 1] images on the device, pixel for pixel what the loader made before (a
    quarter of the bytes to pass between processes and copy; the blur and the jitter, most
    of a loader worker's time per sample on the CPU, done by the device).
    """

    weak: torch.Tensor  # 3 x S x S: what the teacher sees; uint8 pixels, on the device [0, 1] float
    blur: torch.Tensor  # float64: the weak view's blur radius still to apply (0: none), host only
    jitter: torch.Tensor  # 9 float64: the strong view's colour jitter (ColourJitter.code), host only
    proposals: torch.Tensor
    valid: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gt: torch.Tensor  # S x S uint8: hidden truth, diagnostics only
    index: int
    ref_id: int
    sent_id: int
    image_id: int
    sentence: str
    proposal_rows: torch.Tensor | None = None  # None: ``proposals`` laid out whole
    strong: torch.Tensor | None = None  # on the device: the weak view colour-jittered, for the student


def laid_out(sample: UnlabeledSample) -> torch.Tensor:
    """The proposals of a sample or batch laid out whole, on their device: ``N x S x S/8``
    or ``B x Nmax x S x S/8`` uint8 (zeros but the rows given)."""
    if sample.proposal_rows is None:
        return sample.proposals
    lead, s = tuple(sample.valid.shape), sample.weak.shape[-1]
    out = torch.zeros(
        (math.prod(lead) * s, sample.proposals.shape[-1]), dtype=torch.uint8, device=sample.proposals.device
    )
    out.index_copy_(0, sample.proposal_rows, sample.proposals)
    return out.view(*lead, s, sample.proposals.shape[-1])


class UnlabeledDataset(ExpressionDataset):
    """Every expression of the unlabeled refs, with its image's proposals at the input size.

    ``geometric`` moves image, hidden ground truth and proposals together (and may rewrite
    the sentence, e.g. a flip swaps left and right); ``photometric`` then draws the colour
    jitter that makes the strong view from the weak one (applied by
    :func:`unlabeled_to_device`). ``proposal_rule``: how proposals are resized nearest
    (:mod:`semires.resize`). Proposals are read from the store for every item, resized and
    bit-packed without being unpacked (:meth:`ProposalStore.packed_masks`); nothing is kept
    per image. The store opens its arrays lazily in each process that reads it.
    """

    def __init__(
        self,
        refs: Sequence[RefRecord],
        image_dir: str | Path,
        tokenizer: TextTokenizer,
        proposals: str | Path | ProposalStore,
        *,
        image_size: int,
        max_tokens: int,
        geometric: Transform | None = None,
        photometric: ColourJitter | None = None,
        cache_mb: float = 0,
        proposal_rule: NearestRule = "pil",
    ) -> None:
        super().__init__(
            refs,
            image_dir,
            tokenizer,
            image_size=image_size,
            max_tokens=max_tokens,
            cache_mb=cache_mb,
        )
        self.store = proposals if isinstance(proposals, ProposalStore) else ProposalStore(proposals)
        missing = sorted({r.image_id for r in self.refs if r.image_id not in self.store})
        if missing:
            raise SemiresError(
                f"{self.store.path}: no proposals for {len(missing)} unlabeled image(s) (e.g. image "
                f"{missing[0]}); the store was built for another image set: rerun `semires propose`"
            )
        self.geometric = geometric
        self.photometric = photometric
        self.proposal_rule = proposal_rule

    def proposals(self, image_id: int, mirrored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's proposals nearest-resized under ``proposal_rule`` (``"pil"``: as the
        ground truth, lined up with the image; ``"torch"``: as the official code, with
        ``F.interpolate``), mirrored left-right if ``mirrored``, bit-packed, by their
        nonempty rows: ``(rows, where)``, see :class:`UnlabeledSample`
        (:meth:`ProposalStore.packed_rows`)."""
        s = self.image_size
        where, rows = self.store.packed_rows(image_id, (s, s), mirror=mirrored, rule=self.proposal_rule)
        return torch.from_numpy(rows), torch.from_numpy(where)

    def __getitem__(self, key: int | tuple[int, int]) -> UnlabeledSample:  # type: ignore[override]
        index, seed = (key, None) if isinstance(key, int) else key
        r, s = (int(v) for v in self.pairs[index])
        ref = self.refs[r]
        view = View(
            image=self.pixels(ref),
            defer_blur=True,
            masks={"gt": self.mask(ref)},
            packed={"proposals": DeferredMasks(functools.partial(self.proposals, ref.image_id))},
            sentence=ref.sentences[s],
        )
        gen = torch.Generator().manual_seed(int(seed) if seed is not None else index)
        if self.geometric is not None:
            view = self.geometric(view, gen)
        jitter = torch.zeros(9, dtype=torch.float64)  # no jitter: the strong view is the weak one
        if self.photometric is not None:
            jitter = self.photometric.code(gen)
        ids, att = self.tokenizer.encode([view.sentence], self.max_tokens)
        rows, where = packed_tensor(view.packed["proposals"])  # read now, mirrored if the view was flipped
        return UnlabeledSample(
            weak=view.image,
            blur=torch.tensor(view.blur, dtype=torch.float64),
            jitter=jitter,
            proposals=rows,
            valid=torch.ones(self.store.num_masks(ref.image_id), dtype=torch.bool),
            input_ids=ids[0],
            attention_mask=att[0],
            gt=view.masks["gt"],
            index=index,
            ref_id=ref.ref_id,
            sent_id=ref.sent_ids[s],
            image_id=ref.image_id,
            sentence=view.sentence,
            proposal_rows=where,
        )


def collate_unlabeled(items: Sequence[UnlabeledSample]) -> UnlabeledSample:
    """Stack a batch. The proposals stay rows (see :class:`UnlabeledSample`): each sample's
    rows are placed in a batch of the largest count, ``valid`` False for the padding."""
    n = max(len(it.valid) for it in items)
    size = items[0].weak.shape[-1]
    valid = torch.zeros((len(items), n), dtype=torch.bool)
    for i, it in enumerate(items):
        valid[i, : len(it.valid)] = True
    return UnlabeledSample(
        weak=torch.stack([it.weak for it in items]),
        blur=torch.stack([it.blur for it in items]),
        jitter=torch.stack([it.jitter for it in items]),
        proposals=torch.cat([it.proposals for it in items]),
        valid=valid,
        input_ids=torch.stack([it.input_ids for it in items]),
        attention_mask=torch.stack([it.attention_mask for it in items]),
        gt=torch.stack([it.gt for it in items]),
        index=torch.tensor([it.index for it in items]),
        ref_id=torch.tensor([it.ref_id for it in items]),
        sent_id=torch.tensor([it.sent_id for it in items]),
        image_id=torch.tensor([it.image_id for it in items]),
        sentence=[it.sentence for it in items],
        proposal_rows=torch.cat([it.proposal_rows + i * n * size for i, it in enumerate(items)]),
    )


class StepItems(Dataset):
    """The teacher-student loop's two datasets as one: key ``(0, k)`` is ``labeled[k]`` and
    ``(1, k)`` is ``unlabeled[k]``, so one pool of loader workers makes whole steps."""

    def __init__(self, labeled: ExpressionDataset, unlabeled: UnlabeledDataset) -> None:
        self.parts = (labeled, unlabeled)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key: tuple[int, object]) -> Sample | UnlabeledSample:
        part, k = key
        return self.parts[part][k]


class StepBatches(Sampler):
    """One list of :class:`StepItems` keys per step: the labeled sampler's keys of the step,
    then the unlabeled sampler's (both pure functions of seed and step: exact resume)."""

    def __init__(self, labeled: StepSampler, unlabeled: StepSampler) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled

    def __len__(self) -> int:
        return self.labeled.total_steps - self.labeled.start_step

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int]]]]:
        for step in range(self.labeled.start_step, self.labeled.total_steps):
            yield [(0, k) for k in self.labeled.keys_for_step(step)] + [
                (1, k) for k in self.unlabeled.keys_for_step(step)
            ]


def collate_step(items: Sequence[Sample | UnlabeledSample]) -> tuple[Sample, UnlabeledSample]:
    """A step's items -> ``(labeled batch, unlabeled batch)``."""
    labeled = [it for it in items if isinstance(it, Sample)]
    unlabeled = [it for it in items if isinstance(it, UnlabeledSample)]
    return default_collate(labeled), collate_unlabeled(unlabeled)


def unlabeled_to_device(batch: UnlabeledSample, device: torch.device) -> UnlabeledSample:
    """The batch on ``device``: its weak view blurred where drawn (:func:`semires.blur.gaussian_blur`)
    as [0, 1] images, its strong view made from them (:meth:`ColourJitter.apply_codes`), its
    proposals laid out (:func:`laid_out`). The views' numbers are read on the host."""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    pixels = move(batch.weak)
    radii = host_values(batch.blur)
    if any(radii):
        pixels = torch.stack([gaussian_blur(p, r) if r else p for p, r in zip(pixels, radii, strict=True)])
    weak = to_unit(pixels)
    moved = batch._replace(
        weak=weak,
        strong=ColourJitter.apply_codes(weak, batch.jitter),
        proposals=move(batch.proposals),
        proposal_rows=move(batch.proposal_rows),
        valid=move(batch.valid),
        input_ids=move(batch.input_ids),
        attention_mask=move(batch.attention_mask),
        gt=move(batch.gt),
    )
    return moved._replace(proposals=laid_out(moved), proposal_rows=None)


# --- the step ------------------------------------------------------------------------------


def pixel_mean_loss(
    logits: torch.Tensor, target: torch.Tensor, class_weights: Sequence[float]
) -> torch.Tensor:
    """Class-weighted cross-entropy, plain mean over every pixel: the teacher-student step's
    supervised and matched terms, as the public code's
    ``CrossEntropyLoss(weight=class_weights, reduction="none")(logits, target).mean()``.

    ``logits`` B x 2 x H x W, ``target`` B x H x W int64. Unlike ``F.cross_entropy(weight=...)``
    (the burn-in's loss) the sum is divided by the pixel count, not by the sum of the pixels'
    class weights.
    """
    w = class_weight_tensor(tuple(class_weights), logits.device)
    return F.cross_entropy(logits.float(), target, weight=w, reduction="none").mean()


def unsupervised_loss(
    logits: torch.Tensor, refined: Refined, class_weights: Sequence[float], *, pwa: bool = True
) -> torch.Tensor:
    """The public code's loss on refined pseudo-labels, as its teacher-student scripts add it up.

    ``logits`` B x 2 x H x W of the student on the strong view; ``refined`` the batch's
    :class:`~semires.refine.Refined` labels. The samples fall in two groups, each a plain
    mean over all pixels of its samples (not a mean of per-sample means):

    - matched (a proposal replaced the teacher's mask): class-weighted cross-entropy,
      :func:`pixel_mean_loss`;
    - unmatched: with ``pwa``, the cross-entropy *without* class weights times the PWA
      pixel weights (``refined.weights``); without ``pwa`` (a method the public code does
      not have), the matched group's class-weighted loss.

    The result is the mean of the terms of the groups present (halved when both are, the
    term alone when one is), 0 for an empty batch. No host sync.
    """
    w = class_weight_tensor(tuple(class_weights), logits.device)
    per_pixel = F.cross_entropy(logits.float(), refined.labels, reduction="none")  # B x H x W, unweighted
    weighted = per_pixel * w[refined.labels]
    unmatched_pp = per_pixel * refined.weights if pwa else weighted
    m = refined.matched.to(torch.float32)[:, None, None]
    u = 1.0 - m
    pixels = per_pixel[0].numel()
    matched = (weighted * m).sum() / (m.sum() * pixels).clamp_min(1.0)
    unmatched = (unmatched_pp * u).sum() / (u.sum() * pixels).clamp_min(1.0)
    has_m = refined.matched.any().to(torch.float32)
    has_u = (~refined.matched).any().to(torch.float32)
    return (matched * has_m + unmatched * has_u) / (has_m + has_u).clamp_min(1.0)


@dataclass(frozen=True)
class SemiConfig(LoopConfig):
    """The teacher-student loop's knobs: the supervised loop's (``batch_size`` is the labeled
    batch) and the unlabeled batch, refinement, lambda and the EMA rate."""

    unlabeled_batch_size: int = 8  # unlabeled expressions per step and process
    refine: RefineConfig = field(default_factory=RefineConfig)
    sup_weight: float = 1.0  # the supervised term's factor (the public IOM script: 10)
    unsup_weight: float = 1.0
    ema_rate: float = 0.9996


# The profiler ranges of semi_step, in order (the backward's kernels run on the autograd
# engine's thread on a GPU: a profile finds them as autograd::engine::evaluate_function events)
STEP_PHASES = (
    "semi.inputs", "semi.teacher", "semi.refine", "semi.student", "semi.loss", "semi.backward",
    "semi.optimizer", "semi.ema", "semi.diagnostics",
)  # fmt: skip


def semi_step(
    student: nn.Module,
    teacher: nn.Module,
    labeled: Sample,
    unlabeled: UnlabeledSample,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    cfg: SemiConfig,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One teacher-student step; returns detached 0-d tensors (no host sync):

    loss, sup, unsup, matched (share of unlabeled samples a proposal matched), and the mean
    IoU against the hidden truth of the teacher's raw and refined labels (diagnostics).
    The teacher is updated by EMA after the optimiser step. Each phase is a
    ``torch.profiler`` range (``semi.teacher``, ``semi.refine``, ... :data:`STEP_PHASES`), so
    a profile of the step adds its time up by phase.
    """
    with record_function("semi.inputs"):
        lab = to_device(labeled, device)
        unl = unlabeled_to_device(unlabeled, device)
    with record_function("semi.teacher"), torch.no_grad(), autocast(device):
        t_logits = teacher(unl.weak, unl.input_ids, unl.attention_mask)
    with record_function("semi.refine"):
        prob = t_logits.float().softmax(dim=1)[:, 1]
        refined = refine(prob, unl.proposals, unl.valid, cfg.refine)
    b = lab.image.shape[0]
    with record_function("semi.student"):
        images = torch.cat([lab.image, unl.strong])
        ids = torch.cat([lab.input_ids, unl.input_ids])
        att = torch.cat([lab.attention_mask, unl.attention_mask])
        with autocast(device):
            logits = student(images, ids, att)
    with record_function("semi.loss"):
        sup = pixel_mean_loss(logits[:b], lab.mask, cfg.class_weights)
        unsup = unsupervised_loss(logits[b:], refined, cfg.class_weights, pwa=cfg.refine.pwa)
        loss = cfg.sup_weight * sup + cfg.unsup_weight * unsup
    with record_function("semi.backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("semi.optimizer"):
        optimizer.step()
        scheduler.step()
    with record_function("semi.ema"):
        ema_update(teacher, unwrap(student), cfg.ema_rate)
    with record_function("semi.diagnostics"):
        gt = unl.gt.bool()
        raw_iou = iou(*intersection_union(refined.raw.bool(), gt)).mean()
        ref_iou = iou(*intersection_union(refined.labels.bool(), gt)).mean()
        matched = refined.matched.float().mean()
    return {
        "loss": loss.detach(),
        "sup": sup.detach(),
        "unsup": unsup.detach(),
        "matched": matched,
        "raw_iou": raw_iou,
        "refined_iou": ref_iou,
    }


# --- diagnostics ---------------------------------------------------------------------------


def quality_loader(
    dataset: UnlabeledDataset,
    indices: Sequence[int],
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int | None,
) -> DataLoader:
    """The loader :func:`pseudo_label_quality` reads the expressions ``indices`` with."""
    return make_loader(
        Subset(dataset, list(indices)), batch_size=batch_size, device=device, num_workers=num_workers,
        collate_fn=collate_unlabeled,
    )  # fmt: skip


@torch.no_grad()
def pseudo_label_quality(
    teacher: nn.Module,
    dataset: UnlabeledDataset,
    refine_cfg: RefineConfig,
    *,
    device: torch.device,
    batch_size: int = 32,
    indices: Sequence[int] | None = None,
    num_workers: int | None = 0,
    loader: DataLoader | None = None,
) -> dict[str, float]:
    """How good the pseudo-labels are, on unlabeled expressions with their hidden truth.

    The teacher labels each expression's un-augmented view; returns, in percent as the
    evaluation metrics: ``raw_mIoU`` / ``raw_oIoU`` of its hard masks, ``refined_mIoU`` /
    ``refined_oIoU`` after refinement, ``match_rate`` (share a proposal matched) and
    ``pwa_share`` (share trained with PWA weights: unmatched, with PWA on). Batches of
    ``batch_size`` come from a loader with ``num_workers`` processes
    (:func:`quality_loader`), or from ``loader``, one made once; the refinement works
    through their proposals in chunks, so memory stays bounded whatever the batch size and
    proposal count.
    """
    was_training = teacher.training
    teacher.eval()
    idx = list(range(len(dataset))) if indices is None else list(indices)
    inter_raw, union_raw, inter_ref, union_ref, matched = [], [], [], [], []
    if loader is None:
        loader = quality_loader(dataset, idx, batch_size=batch_size, device=device, num_workers=num_workers)
    try:
        for batch in loader if idx else ():
            b = unlabeled_to_device(batch, device)
            with autocast(device):
                logits = teacher(b.weak, b.input_ids, b.attention_mask)
            prob = logits.float().softmax(dim=1)[:, 1]
            r = refine(prob, b.proposals, b.valid, refine_cfg)
            gt = b.gt.bool()
            i0, u0 = intersection_union(r.raw.bool(), gt)
            i1, u1 = intersection_union(r.labels.bool(), gt)
            inter_raw.append(i0.cpu())
            union_raw.append(u0.cpu())
            inter_ref.append(i1.cpu())
            union_ref.append(u1.cpu())
            matched.append(r.matched.cpu())
    finally:
        teacher.train(was_training)
    if not idx:
        return {}
    out: dict[str, float] = {}
    for name, i, u in (
        ("raw", torch.cat(inter_raw), torch.cat(union_raw)),
        ("refined", torch.cat(inter_ref), torch.cat(union_ref)),
    ):
        out[f"{name}_mIoU"] = 100.0 * float(iou(i, u).mean())
        out[f"{name}_oIoU"] = 100.0 * float(i.sum()) / max(1, int(u.sum()))
    rate = float(torch.cat(matched).float().mean())
    out["match_rate"] = 100.0 * rate
    out["pwa_share"] = 100.0 * (1.0 - rate) if refine_cfg.pwa else 0.0
    return out


# --- the loop ------------------------------------------------------------------------------

MetricsHook = Callable[[int, dict[str, float]], None]


@dataclass
class SemiResult(LoopResult):
    teacher: nn.Module | None = None
    start_quality: dict[str, float] | None = None
    final_quality: dict[str, float] | None = None


def train_semi(
    student: nn.Module,
    spec: ModelSpec,
    labeled_set: ExpressionDataset,
    unlabeled_set: UnlabeledDataset,
    val_set: ExpressionDataset | None,
    cfg: SemiConfig,
    *,
    scratch: str | Path,
    run_key: str,
    resume: bool = False,
    dist_info: distributed.DistInfo | None = None,
    on_metrics: MetricsHook | None = None,
    quality_set: UnlabeledDataset | None = None,
    quality_indices: Sequence[int] | None = None,
    stop_after: int | None = None,
) -> SemiResult:
    """Teacher-student training of ``student`` (initialised by the caller, e.g. from burn-in).

    The teacher starts as a copy of the student. Rank 0 keeps the full state (student,
    teacher, optimiser, scheduler, every RNG, step) at ``scratch`` every
    ``cfg.checkpoint_every`` steps; ``resume`` continues from it exactly. Both samplers are
    pure functions of ``(seed, step)``. ``quality_set`` (un-augmented unlabeled
    expressions) is scored by :func:`pseudo_label_quality` at the start and at every
    evaluation, logged as ``pseudo/*``.
    """
    info = dist_info or distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    device, scratch = info.device, Path(scratch)
    torch.manual_seed(cfg.seed + info.rank)
    # the teacher must be the same on every rank: with several CUDA processes the BatchNorm
    # statistics are synchronised (SyncBatchNorm, as the official scripts), else the
    # teacher's are averaged after each step (distributed.average_buffers)
    student = distributed.sync_batchnorm(student, device)
    average_teacher_buffers = info.world_size > 1 and not distributed.batchnorm_synced(student)
    training_mode(student.to(device), cfg.bert_dropout)
    # compiled and channels-last before the copy: the teacher's copied forwards run its own weights
    speed_up(student, compile=cfg.compile, channels_last=cfg.channels_last, backend=cfg.compile_backend)
    teacher = copy.deepcopy(student).to(device)
    teacher.requires_grad_(False)
    teacher.eval()
    optimizer = make_optimizer(
        student, lr=cfg.lr, weight_decay=cfg.weight_decay, no_decay=cfg.no_decay, bert_layers=cfg.bert_layers
    )
    scheduler = poly_schedule(optimizer, total_steps=cfg.steps, power=cfg.poly_power, horizon=cfg.lr_horizon)
    start = 0
    best = BestOnVal(cfg.patience) if cfg.keep == "best_val" else None  # selected on the teacher
    if resume and scratch.is_file():
        ckpt = load_checkpoint(scratch, expect_fingerprint=spec.fingerprint(), expect_run_key=run_key)
        if ckpt.teacher is None:
            raise SemiresError(f"{scratch}: not a teacher-student checkpoint; delete it to start afresh")
        teacher.load_state_dict(ckpt.teacher)
        start = restore(ckpt, student, optimizer, scheduler, info, cfg.seed)
        if best is not None:
            best.load(ckpt.best)
    net = DistributedDataParallel(student) if info.world_size > 1 else student

    def sampler(dataset, batch_size, seed):
        return StepSampler(
            dataset,
            batch_size=batch_size,
            total_steps=cfg.steps,
            seed=seed,
            start_step=start,
            rank=info.rank,
            world_size=info.world_size,
        )

    steps = StepBatches(
        sampler(labeled_set, cfg.batch_size, cfg.seed),
        sampler(unlabeled_set, cfg.unlabeled_batch_size, cfg.seed + 1),
    )
    loader = make_loader(
        StepItems(labeled_set, unlabeled_set), batch_sampler=steps, collate_fn=collate_step,
        device=device, num_workers=cfg.num_workers, seed=cfg.seed,
    )  # fmt: skip
    # evaluation loaders made once, their workers forked now (start_workers), not at every
    # evaluation from the process the training steps have grown
    val_loader = q_loader = None
    if info.is_main and val_set is not None:
        val_loader = eval_loader(
            val_set, batch_size=cfg.eval_batch_size, device=device, num_workers=cfg.num_workers
        )
    if info.is_main and quality_set is not None:
        picks = range(len(quality_set)) if quality_indices is None else quality_indices
        q_loader = quality_loader(
            quality_set, picks, batch_size=cfg.eval_batch_size, device=device, num_workers=cfg.num_workers
        )
    batches = iter(loader)
    start_workers(val_loader, q_loader)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)

    def quality() -> dict[str, float] | None:
        if quality_set is None or not info.is_main:
            return None
        return pseudo_label_quality(teacher, quality_set, cfg.refine, device=device, loader=q_loader)

    def save(step: int) -> None:
        states = gather_objects(rng_state())
        if info.is_main:
            save_checkpoint(
                scratch, spec=spec, model=student, step=step, run_key=run_key, optimizer=optimizer,
                scheduler=scheduler, rng={"ranks": states}, teacher=teacher,
                best=best.state() if best is not None else None,
            )  # fmt: skip

    t0 = time.perf_counter()
    first_quality = quality() if start == 0 else None
    if first_quality is not None and on_metrics is not None:
        on_metrics(0, {f"pseudo/{k}": v for k, v in first_quality.items()})
    sums: dict[str, torch.Tensor] = {}
    count = 0
    final: Evaluation | None = None
    last_quality = first_quality
    watch, saved = NonFiniteWatch(device), (start or None)
    step = start
    for lab, unl in batches:
        lr = optimizer.param_groups[0]["lr"]
        stats = semi_step(net, teacher, lab, unl, optimizer, scheduler, cfg=cfg, device=device)
        if average_teacher_buffers:
            distributed.average_buffers(teacher)
        for k, v in stats.items():
            sums[k] = sums[k] + v if k in sums else v.clone()
        count += 1
        step += 1
        watch.update(stats["loss"], step)  # on the device: no host sync
        last = step == cfg.steps
        at_log = step % cfg.log_every == 0 or last
        at_eval = last or bool(cfg.eval_every and step % cfg.eval_every == 0)
        at_save = step == end or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if at_log or at_eval or at_save:
            watch.check(scratch, saved)  # a non-finite loss is never logged, evaluated or saved
        if on_metrics is not None and info.is_main and at_log:
            logged = {f"train/{k}": float(v) / count for k, v in sums.items()}  # the one sync per log
            logged["train/lr"] = lr
            on_metrics(step, logged)
            sums, count = {}, 0
        stop = False
        if at_eval:
            if info.is_main:
                row: dict[str, float] = {}
                if val_set is not None:
                    final = evaluate(unwrap(net), val_set, device=device, loader=val_loader)
                    training_mode(student, cfg.bert_dropout)  # evaluate restores train() everywhere
                    row = {f"val/{k}": v for k, v in final.metrics.items() if k != "count"}
                    if best is not None:  # the official selection: the teacher's val oIoU
                        t_eval = evaluate(teacher, val_set, device=device, loader=val_loader)
                        best.update(step, t_eval.metrics, {"model": student, "teacher": teacher})
                        row.update({f"val_teacher/{k}": v for k, v in t_eval.metrics.items() if k != "count"})
                q = quality()
                last_quality = q if q is not None else last_quality
                if on_metrics is not None:
                    row.update({f"pseudo/{k}": v for k, v in (q or {}).items()})
                    on_metrics(step, row)
            stop = best is not None and stop_all(best.exhausted())
            distributed.barrier()
        if at_save:
            save(step)
            saved = step
            distributed.barrier()
        if step == end or stop:  # stop: no better teacher val oIoU for cfg.patience evaluations
            break
    if final is None and val_set is not None and step == cfg.steps and info.is_main:
        final = evaluate(unwrap(net), val_set, device=device, loader=val_loader)
        if best is not None:
            best.update(step, evaluate(teacher, val_set, device=device, loader=val_loader).metrics,
                        {"model": student, "teacher": teacher})  # fmt: skip
        last_quality = quality()
    selected = None
    if best is not None and info.is_main:  # the teacher's evaluation at the selected step
        final, selected = keep_best(best, None, step, {"model": student, "teacher": teacher})
    return SemiResult(
        steps=step,
        resumed_from=start,
        seconds=time.perf_counter() - t0,
        final_eval=final,
        teacher=teacher,
        start_quality=first_quality,
        final_quality=last_quality,
        selected_step=selected,
    )
