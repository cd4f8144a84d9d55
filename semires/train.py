"""Training: the supervised step and loop (the burn-in), evaluation, and resumable checkpoints.

The loop reads as a story — setup, batch, step, log, evaluate, save — and its parts stand on
their own so the teacher-student loop can reuse them: :func:`make_optimizer` and
:func:`poly_schedule`, :func:`segmentation_loss` (class- and optionally pixel-weighted),
:func:`supervised_step`, :func:`evaluate`, :func:`save_checkpoint` / :func:`load_checkpoint`
(model, optimiser, scheduler, step and every RNG, checked against the configuration that
wrote them).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from semires import distributed
from semires.atomic import atomic_path
from semires.data import ExpressionDataset, Sample, StepSampler, make_loader, start_workers, to_unit
from semires.errors import CollectiveError, SemiresError
from semires.logits import difference, foreground, forward
from semires.metrics import intersection_union, iou, summarize
from semires.model.build import ModelSpec, build_from_spec
from semires.model.speed import speed_up

CHECKPOINT_FORMAT = "semires-lavt"
CHECKPOINT_VERSION = 2
# Why a checkpoint of an older version cannot be read (its weights belong to another function)
_OLD_VERSIONS = {
    1: "LAVT computed another function than LAVT's (timm's shifted windows, align_corners=False "
    "upsampling, PWAM scaled per head) and whose tokenizer kept [SEP] in long sentences: its weights "
    "would give other masks",
}
_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "position_embeddings")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


# --- optimisation ---------------------------------------------------------------------------


NO_DECAY_RULES = ("official", "norms")
# Names the official optimiser exempts from weight decay, among the Swin backbone's parameters
_OFFICIAL_NO_DECAY = ("norm", "absolute_pos_embed", "relative_position_bias_table")
# The parts of a semires LAVT that are the official model's ``backbone`` (Swin with PWAM,
# gates and the stage norms inside it); the decoder is its ``classifier``, all decayed
_OFFICIAL_BACKBONE = ("backbone", "fusion", "gates", "norms")


def _no_decay_official(name: str) -> bool:
    """The official rule on a semires LAVT parameter name: no decay only for backbone
    parameters whose official name holds ``norm``, ``absolute_pos_embed`` or
    ``relative_position_bias_table``. Swin's names are the official ones; ``norms.i`` is
    the official ``norm{i}``; PWAM and gate parameters hold none of the words (PWAM's
    instance norms have no parameters), so they decay, as the decoder's (its BatchNorms too)
    and BERT's (its LayerNorms too)."""
    return name.split(".")[0] in _OFFICIAL_BACKBONE and any(k in name for k in _OFFICIAL_NO_DECAY)


def frozen_text(model: nn.Module, bert_layers: int | None) -> set[str]:
    """Names of the text encoder's parameters that never update when only BERT's first
    ``bert_layers`` encoder layers train (the official optimiser's layers 0-9: embeddings
    and the later layers stay as loaded); empty for None (all of BERT trains)."""
    if bert_layers is None:
        return set()
    keep = tuple(f"text.bert.encoder.layer.{i}." for i in range(bert_layers))
    return {n for n, _ in model.named_parameters() if n.startswith("text.") and not n.startswith(keep)}


def param_groups(
    model: nn.Module, weight_decay: float, *, no_decay: str = "norms", bert_layers: int | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: ``decay`` (``weight_decay``) and ``no decay``.

    ``no_decay``: ``"norms"`` exempts every normalisation layer and position
    bias/embedding (BERT's included); ``"official"`` exempts what the official optimiser
    does (:func:`_no_decay_official`). ``bert_layers``: the text parameters outside BERT's
    first ``bert_layers`` encoder layers are frozen (``requires_grad`` off, in no group;
    :func:`frozen_text`).
    """
    if no_decay not in NO_DECAY_RULES:
        raise ValueError(f"no_decay {no_decay!r}: expected one of {NO_DECAY_RULES}")
    frozen = frozen_text(model, bert_layers)
    no_decay_ids = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if full in frozen:
                p.requires_grad_(False)
            if no_decay == "official":
                exempt = _no_decay_official(full)
            else:
                exempt = isinstance(module, _NORMS) or any(n in full for n in _NO_DECAY_NAMES)
            if exempt:
                no_decay_ids.add(id(p))
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay_ids]
    no_decay_params = [p for p in model.parameters() if p.requires_grad and id(p) in no_decay_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay_params, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    no_decay: str = "norms",
    bert_layers: int | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel where the parameters' device has one
    (CPU, CUDA): one kernel for all tensors instead of a loop, 9 % of a tiny-LAVT CPU step."""
    devices = {p.device.type for p in model.parameters()}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"}
    groups = param_groups(model, weight_decay, no_decay=no_decay, bert_layers=bert_layers)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def training_mode(model: nn.Module, bert_dropout: bool = True) -> nn.Module:
    """``model`` in training mode; with ``bert_dropout`` off its text encoder stays in eval
    mode (no dropout), as the official burn-in leaves the BERT it loaded. Returns ``model``."""
    model.train()
    text = getattr(unwrap(model), "text", None)
    if not bert_dropout and isinstance(text, nn.Module):
        text.eval()
    return model


def poly_factor(step: int, total_steps: int, power: float, horizon: int | None = None) -> float:
    """The learning-rate factor of step ``step`` (0-based).

    Without ``horizon``: ``(1 - step / (total - 1)) ** power``, 1 at the first step and
    exactly 0 at the last one (``total_steps - 1``). With it: ``(1 - step / horizon) **
    power``, the official scripts' ``LambdaLR`` (their horizon is the loaders' lengths times
    the epochs, so the rate never reaches 0); 0 from ``horizon`` on.
    """
    if horizon is not None:
        return max(0.0, 1.0 - step / horizon) ** power
    if total_steps <= 1:
        return 1.0
    return max(0.0, 1.0 - min(step, total_steps - 1) / (total_steps - 1)) ** power


def poly_schedule(
    optimizer: torch.optim.Optimizer, *, total_steps: int, power: float, horizon: int | None = None
):
    """Polynomial decay stepped once per training step (``scheduler.step()`` after each)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: poly_factor(s, total_steps, power, horizon))


@functools.lru_cache(maxsize=16)
def class_weight_tensor(class_weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The class weights on ``device``, made once: a fresh host-to-GPU copy every step would
    make the step wait for the host."""
    return torch.tensor(class_weights, dtype=torch.float32, device=device)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: Sequence[float],
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-weighted cross-entropy, optionally times per-pixel weights.

    ``logits`` B x 2 x H x W, ``target`` B x H x W int64, ``pixel_weights`` B x H x W or None.
    Without pixel weights this is ``F.cross_entropy(weight=class_weights)`` (the weighted
    mean); with them, each pixel's term is also scaled by its weight, same normaliser.
    """
    w = class_weight_tensor(tuple(class_weights), logits.device)
    if pixel_weights is None:
        return F.cross_entropy(logits.float(), target, weight=w)
    per_pixel = F.cross_entropy(logits.float(), target, weight=w, reduction="none")
    return (per_pixel * pixel_weights).sum() / w[target].sum()


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (full precision keeps CPU runs exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: Sample, device: torch.device) -> Sample:
    """The batch on ``device``, its images as [0, 1] float (a loader ships uint8 pixels)."""
    image = batch.image.to(device, non_blocking=True)
    return batch._replace(
        image=to_unit(image) if image.dtype == torch.uint8 else image,
        mask=batch.mask.to(device, non_blocking=True),
        input_ids=batch.input_ids.to(device, non_blocking=True),
        attention_mask=batch.attention_mask.to(device, non_blocking=True),
    )


def supervised_step(
    model: nn.Module,
    batch: Sample,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    class_weights: Sequence[float],
    device: torch.device,
) -> torch.Tensor:
    """One optimisation step on a labeled batch; returns the loss, a detached 0-d tensor on
    the device (no host sync: :class:`NonFiniteWatch` and the loop's log read it later)."""
    batch = to_device(batch, device)
    with autocast(device):
        logits = model(batch.image, batch.input_ids, batch.attention_mask)
    loss = segmentation_loss(logits, batch.mask, class_weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


# --- evaluation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpressionResult:
    ref_id: int
    sent_id: int
    image_id: int
    sentence: str
    inter: int
    union: int
    iou: float


@dataclass
class Evaluation:
    results: list[ExpressionResult]
    metrics: dict[str, float]


def eval_loader(
    dataset: ExpressionDataset, *, batch_size: int, device: torch.device, num_workers: int | None
) -> DataLoader:
    """The loader :func:`evaluate` reads ``dataset`` with: every expression in order."""
    return make_loader(dataset, batch_size=batch_size, device=device, num_workers=num_workers)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ExpressionDataset,
    *,
    device: torch.device,
    batch_size: int = 16,
    resolution: str = "input",
    num_workers: int | None = 0,
    loader: DataLoader | None = None,
    precision: str = "fp32",
) -> Evaluation:
    """Every expression of ``dataset``: IoU of the argmax mask, and the split's metrics.

    ``resolution="input"`` compares at the model's input size against the ground truth
    resized with PIL's nearest (LAVT's protocol); ``"original"`` upsamples the logits (bilinear) to each
    image's own size, as prediction does (:func:`semires.logits.foreground`), and compares
    with the full-resolution mask. ``loader``: batches of ``dataset`` from a loader made once
    (:func:`eval_loader`) instead of a new one. ``precision``: ``"fp32"`` (the paper's) or
    ``"bf16"`` (:func:`semires.logits.forward`).
    """
    if resolution not in ("input", "original"):
        raise ValueError(f"resolution must be 'input' or 'original', not {resolution!r}")
    was_training = model.training
    model.eval()
    if loader is None:
        loader = eval_loader(dataset, batch_size=batch_size, device=device, num_workers=num_workers)
    results: list[ExpressionResult] = []
    try:
        for batch in loader:
            b = to_device(batch, device)
            logits = forward(model, b.image, b.input_ids, b.attention_mask, precision=precision)
            if resolution == "input":
                inter, union = intersection_union(logits.argmax(1), b.mask.bool())
            else:
                d = difference(logits)
                pairs = []
                for k, idx in enumerate(batch.index.tolist()):
                    gt = dataset.full_mask(idx).to(device)
                    pairs.append(intersection_union(foreground(d[k], tuple(gt.shape))[None], gt[None]))
                inter = torch.cat([p[0] for p in pairs])
                union = torch.cat([p[1] for p in pairs])
            inter, union = inter.cpu(), union.cpu()
            ious = iou(inter, union)
            for k in range(len(inter)):
                results.append(
                    ExpressionResult(
                        ref_id=int(batch.ref_id[k]),
                        sent_id=int(batch.sent_id[k]),
                        image_id=int(batch.image_id[k]),
                        sentence=batch.sentence[k],
                        inter=int(inter[k]),
                        union=int(union[k]),
                        iou=float(ious[k]),
                    )
                )
    finally:
        model.train(was_training)
    inter = torch.tensor([r.inter for r in results], dtype=torch.long)
    union = torch.tensor([r.union for r in results], dtype=torch.long)
    return Evaluation(results, summarize(inter, union))


# --- checkpoints ---------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain containers."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns; the training parts are None in a final checkpoint."""

    spec: ModelSpec
    model: dict[str, torch.Tensor]
    step: int
    run_key: str = ""
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] | None = None  # the EMA teacher of a teacher-student run
    best: dict[str, Any] | None = None  # a "best on val" run's best so far (BestOnVal.state)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (just ``[obj]`` without a process group)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def save_checkpoint(
    path: str | Path,
    *,
    spec: ModelSpec,
    model: nn.Module,
    step: int,
    run_key: str = "",
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    rng: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
    best: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically. ``run_key`` names the run's inputs (data, params) so a
    resume from another run's checkpoint is refused; ``rng`` is e.g. ``{"ranks": [rng_state()]}``;
    ``meta`` holds plain values only; ``teacher`` is a teacher-student run's EMA teacher;
    ``best`` a "best on val" run's best weights so far (:meth:`BestOnVal.state`)."""
    obj: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "spec": spec.to_dict(),
        "fingerprint": spec.fingerprint(),
        "run_key": run_key,
        "step": step,
        "model": unwrap(model).state_dict(),
        "meta": meta or {},
    }
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        obj["scheduler"] = scheduler.state_dict()
    if rng is not None:
        obj["rng"] = rng
    if teacher is not None:
        obj["teacher"] = unwrap(teacher).state_dict()
    if best is not None:
        obj["best"] = best
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # the zip writer's message hides why a write failed (a full disk)
            cause = _os_error(e)
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(tmp)) from e


def _os_error(e: BaseException) -> OSError | None:
    """The OSError among the exceptions that led to ``e``, if any."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint file was written at, its tensors memory-mapped rather than read;
    None when it cannot be read (the loader that resumes from it says what is wrong)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return None


def load_checkpoint(
    path: str | Path, *, expect_fingerprint: str | None = None, expect_run_key: str | None = None
) -> Checkpoint:
    """Read a checkpoint (``weights_only``), refusing one of another model or run."""
    path = Path(path)
    if not path.is_file():
        raise SemiresError(f"{path}: checkpoint not found; run the stage that writes it (e.g. `dvc repro`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = _load_error(path, e)
        raise SemiresError(f"{path}: not a readable checkpoint ({why}); delete it and retrain") from e
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise SemiresError(f"{path}: not a semires LAVT checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if obj.get("version") != CHECKPOINT_VERSION:
        why = _OLD_VERSIONS.get(obj.get("version"))
        raise SemiresError(
            f"{path}: checkpoint version {obj.get('version')!r}, this semires reads {CHECKPOINT_VERSION}"
            + (f": written by an earlier semires whose {why}" if why else "")
            + "; retrain it (dvc repro reruns the stages that wrote it)"
        )
    try:
        spec = ModelSpec.from_dict(obj["spec"])
        step = int(obj["step"])
        if not isinstance(obj["model"], dict):
            raise TypeError("its model entry is not a state dict")
    except (KeyError, TypeError, ValueError) as e:
        raise SemiresError(f"{path}: damaged semires checkpoint ({e!r}); delete it and retrain") from e
    if expect_fingerprint is not None and spec.fingerprint() != expect_fingerprint:
        raise SemiresError(
            f"{path}: written for another model configuration ({spec.config.name}, "
            f"{spec.config.image_size}px, fingerprint {spec.fingerprint()} != {expect_fingerprint}); "
            "delete it or restore the model.* params it was trained with"
        )
    if expect_run_key is not None and obj.get("run_key") != expect_run_key:
        raise SemiresError(
            f"{path}: written by a run with other inputs (data, split or training params); "
            "delete it to start afresh"
        )
    return Checkpoint(
        spec=spec,
        model=obj["model"],
        step=step,
        run_key=str(obj.get("run_key", "")),
        optimizer=obj.get("optimizer"),
        scheduler=obj.get("scheduler"),
        rng=obj.get("rng"),
        meta=dict(obj.get("meta", {})),
        teacher=obj.get("teacher"),
        best=obj.get("best"),
    )


def load_model(path: str | Path) -> tuple[ModelSpec, nn.Module, Checkpoint]:
    """A trained model from a checkpoint, rebuilt from the spec it carries."""
    ckpt = load_checkpoint(path)
    model = build_from_spec(ckpt.spec)
    misfit = state_dict_misfit(model, ckpt.model)
    try:
        if misfit is None:
            model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        misfit = str(e).strip().splitlines()[-1].strip()
    if misfit is not None:
        raise SemiresError(
            f"{path}: weights do not fit the model the checkpoint describes ({misfit}); "
            "the file is damaged or was edited: delete it and retrain"
        )
    return ckpt.spec, model, ckpt


def state_dict_misfit(model: nn.Module, state: dict[str, Any]) -> str | None:
    """Why ``state`` does not load into ``model``, in one line (None if it fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
    if shape:
        k = shape[0]
        got, want = list(getattr(state[k], "shape", [])), list(own[k].shape)
        parts.append(f"wrong shape {len(shape)} (e.g. {k}: {got} in the file, {want} in the model)")
    return "; ".join(parts) or None


def _load_error(path: Path, e: Exception) -> str:
    """``torch.load``'s failure in a few words: the first line of its message."""
    if not zipfile.is_zipfile(path):
        return "truncated, or not a file written by torch.save"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first.split(". ")[0].rstrip(".")[:200]


def state_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Lay out every per-parameter state tensor (AdamW's moments) in memory as its parameter.

    A run resumed with another ``channels_last`` setting loads moments saved in the other
    layout; the fused AdamW kernel walks a parameter and its moments in storage order, so
    moments laid out otherwise would pair wrong elements (no error, another update)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def restore(
    ckpt: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: distributed.DistInfo,
    seed: int,
) -> int:
    """Load a scratch checkpoint's training state into a run; returns the step to continue at.

    Each rank continues its own random stream; with another process count exactness is lost
    anyway, so the ranks reseed from the first one's plus the rank."""
    model.load_state_dict(ckpt.model)
    optimizer.load_state_dict(ckpt.optimizer)
    state_like_params(optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    if ckpt.rng is not None:
        ranks = ckpt.rng.get("ranks", [ckpt.rng])
        set_rng_state(ranks[info.rank] if len(ranks) == info.world_size else ranks[0])
        if len(ranks) != info.world_size:
            torch.manual_seed(seed + 1000 * ckpt.step + info.rank)
    return ckpt.step


# --- non-finite losses --------------------------------------------------------------------


class NonFiniteWatch:
    """The first step whose loss was not finite (NaN or infinite), so that a run stops there
    instead of training, evaluating and saving a broken model.

    :meth:`update` keeps the step on the loss's device when the loss is a tensor: no host
    sync per step (neither training step has one). :meth:`check` reads it (one sync, and
    one collective under DDP so that every rank stops together) and is called where the loop
    syncs anyway: before logging, evaluating and saving a checkpoint, which is therefore
    never written after a non-finite step.
    """

    _NONE = torch.iinfo(torch.int64).max

    def __init__(self, device: torch.device) -> None:
        self._first = torch.full((), self._NONE, dtype=torch.int64, device=device)
        self._host: int | None = None  # a loss already on the host (a float)

    def update(self, loss: torch.Tensor | float, step: int) -> None:
        """Note the loss of ``step`` (1-based: the step just taken)."""
        if isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach())
            self._first = torch.where(bad, torch.clamp(self._first, max=step), self._first)
        elif self._host is None and not math.isfinite(loss):
            self._host = step

    def first_step(self) -> int | None:
        """The first non-finite step of any rank, or None (a host sync; a collective under DDP)."""
        first = self._first
        if self._host is not None:
            first = torch.clamp(first, max=self._host)
        if torch.distributed.is_initialized():
            first = first.clone()
            if torch.distributed.get_backend() == "nccl" and first.device.type != "cuda":
                first = first.cuda()
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        value = int(first)
        return None if value == self._NONE else value

    def check(self, scratch: Path, saved: int | None) -> None:
        """Raise on every rank if a step's loss was not finite; ``saved``: the step of the
        checkpoint at ``scratch`` (None: none yet)."""
        step = self.first_step()
        if step is None:
            return
        kept = f"{scratch} (step {saved}) stays" if saved is not None else "none was saved yet"
        raise CollectiveError(
            f"the training loss became non-finite (NaN or infinite) at step {step}; the run stopped "
            f"without saving a checkpoint after it, and the last good checkpoint {kept}: lower the "
            "learning rate or check the inputs, then rerun"
        )


# --- which weights a run keeps ---------------------------------------------------------

KEEP = ("last", "best_val")


class BestOnVal:
    """The official selection: the weights of the evaluation with the best val oIoU (strictly
    better than every earlier one), and how many evaluations since it (``stale``); with
    ``patience`` the run stops once ``stale`` reaches it (the official teacher-student
    scripts: 5 epochs). The weights are kept as CPU copies, by name (``"model"``,
    ``"teacher"``), and travel in the scratch checkpoint so that a resumed run selects as an
    unbroken one.
    """

    def __init__(self, patience: int | None = None) -> None:
        self.patience = patience
        self.step: int | None = None
        self.oiou = -math.inf
        self.metrics: dict[str, float] = {}
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        self.stale = 0

    def update(self, step: int, metrics: dict[str, float], networks: dict[str, nn.Module]) -> bool:
        """Note an evaluation at ``step``; True (and the networks' weights copied) if it is the best."""
        if metrics["oIoU"] > self.oiou:
            self.step, self.oiou, self.metrics, self.stale = step, float(metrics["oIoU"]), dict(metrics), 0
            self.weights = {
                k: {n: t.detach().to("cpu", copy=True) for n, t in unwrap(m).state_dict().items()}
                for k, m in networks.items()
            }
            return True
        self.stale += 1
        return False

    def exhausted(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "oIoU": self.oiou, "metrics": self.metrics, "stale": self.stale,
                "weights": self.weights}  # fmt: skip

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.step, self.oiou, self.stale = state["step"], float(state["oIoU"]), int(state["stale"])
            self.metrics, self.weights = dict(state["metrics"]), state["weights"]

    def restore(self, networks: dict[str, nn.Module]) -> None:
        """Load the best weights into ``networks`` (nothing if no evaluation was made)."""
        for k, m in networks.items():
            if k in self.weights:
                unwrap(m).load_state_dict(self.weights[k])


def keep_best(
    best: BestOnVal | None, final: Evaluation | None, final_step: int, networks: dict[str, nn.Module]
) -> tuple[Evaluation | None, int | None]:
    """At the end of a run: with a best step, its weights into ``networks`` and its evaluation
    (the per-expression results only if it is ``final``, made at ``final_step``); else
    ``final`` as it is."""
    if best is None or best.step is None:
        return final, None
    best.restore(networks)
    if final is not None and best.step == final_step:
        return final, best.step
    return Evaluation([], dict(best.metrics)), best.step


def stop_all(stop: bool) -> bool:
    """Rank 0's decision, on every rank (``stop`` of the other ranks is ignored)."""
    if not torch.distributed.is_initialized():
        return stop
    flag = [stop]
    torch.distributed.broadcast_object_list(flag, src=0)
    return bool(flag[0])


# --- the supervised loop -------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    batch_size: int
    lr: float = 5e-5
    weight_decay: float = 1e-2
    poly_power: float = 0.9
    lr_horizon: int | None = None  # None: the poly decay reaches 0 at the last step (poly_factor)
    class_weights: tuple[float, float] = (0.9, 1.1)
    no_decay: str = "norms"  # which parameters AdamW does not decay (param_groups)
    bert_layers: int | None = None  # None: all of BERT trains; n: its first n encoder layers only
    bert_dropout: bool = True  # BERT's dropout on while training (training_mode)
    keep: str = "last"  # the weights a run ends with: last | best_val (BestOnVal)
    patience: int | None = None  # best_val: stop after this many evaluations without a better one
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 50
    seed: int = 0
    num_workers: int | None = 0  # DataLoader workers (None: semires.data.auto_workers)
    eval_batch_size: int = 32
    compile: str = "none"  # torch.compile of the model: none | regional | full (semires.model.speed)
    channels_last: bool = False  # convolution weights NHWC (semires.model.speed.use_channels_last)
    compile_backend: str | None = None  # None: semires.model.speed.DEFAULT_BACKEND (inductor)


@dataclass
class LoopResult:
    steps: int
    resumed_from: int
    seconds: float
    final_eval: Evaluation | None  # of the weights the run ends with (the best step's with best_val)
    selected_step: int | None = None  # best_val: the step whose weights the model now holds


MetricsHook = Callable[[int, dict[str, float]], None]


def train_supervised(
    model: nn.Module,
    spec: ModelSpec,
    train_set: ExpressionDataset,
    val_set: ExpressionDataset | None,
    cfg: LoopConfig,
    *,
    scratch: str | Path,
    run_key: str,
    resume: bool = False,
    dist_info: distributed.DistInfo | None = None,
    on_metrics: MetricsHook | None = None,
    stop_after: int | None = None,
) -> LoopResult:
    """Supervised training of ``model`` for ``cfg.steps`` steps on ``train_set``.

    Rank 0 keeps a checkpoint with the full training state at ``scratch`` every
    ``cfg.checkpoint_every`` steps; with ``resume`` a run continues from it exactly (same
    batches, same RNG draws). ``on_metrics(step, {...})`` receives the train loss and lr every
    ``cfg.log_every`` steps and the val metrics (``val/oIoU``...) at evaluation steps (rank 0).
    ``stop_after`` ends the run early after that many steps (to test resuming).
    """
    # setup
    info = dist_info or distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    device, scratch = info.device, Path(scratch)
    torch.manual_seed(cfg.seed + info.rank)
    model = distributed.sync_batchnorm(model, device)  # several CUDA processes: SyncBatchNorm, as LAVT
    training_mode(model.to(device), cfg.bert_dropout)
    speed_up(model, compile=cfg.compile, channels_last=cfg.channels_last, backend=cfg.compile_backend)
    optimizer = make_optimizer(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, no_decay=cfg.no_decay, bert_layers=cfg.bert_layers
    )
    scheduler = poly_schedule(optimizer, total_steps=cfg.steps, power=cfg.poly_power, horizon=cfg.lr_horizon)
    start = 0
    best = BestOnVal(cfg.patience) if cfg.keep == "best_val" else None
    if resume and scratch.is_file():
        ckpt = load_checkpoint(scratch, expect_fingerprint=spec.fingerprint(), expect_run_key=run_key)
        start = restore(ckpt, model, optimizer, scheduler, info, cfg.seed)
        if best is not None:
            best.load(ckpt.best)
    net = DistributedDataParallel(model) if info.world_size > 1 else model
    sampler = StepSampler(
        train_set,
        batch_size=cfg.batch_size,
        total_steps=cfg.steps,
        seed=cfg.seed,
        start_step=start,
        rank=info.rank,
        world_size=info.world_size,
    )
    loader = make_loader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, device=device, num_workers=cfg.num_workers,
        seed=cfg.seed,
    )  # fmt: skip
    val_loader = None
    if val_set is not None and info.is_main:
        val_loader = eval_loader(
            val_set, batch_size=cfg.eval_batch_size, device=device, num_workers=cfg.num_workers
        )
    batches = iter(loader)
    start_workers(val_loader)  # forked now, not from the process the training steps have grown
    t0, losses, final = time.perf_counter(), [], None
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)

    def save(step: int) -> None:
        states = gather_objects(rng_state())
        if info.is_main:
            save_checkpoint(
                scratch, spec=spec, model=model, step=step, run_key=run_key,
                optimizer=optimizer, scheduler=scheduler, rng={"ranks": states},
                best=best.state() if best is not None else None,
            )  # fmt: skip

    watch, saved = NonFiniteWatch(device), (start or None)
    step = start
    for batch in batches:
        # batch, step
        lr = optimizer.param_groups[0]["lr"]
        losses.append(
            supervised_step(net, batch, optimizer, scheduler, class_weights=cfg.class_weights, device=device)
        )
        step += 1
        watch.update(losses[-1], step)
        last = step == cfg.steps
        at_log = step % cfg.log_every == 0 or last
        at_eval = val_set is not None and (last or bool(cfg.eval_every and step % cfg.eval_every == 0))
        at_save = step == end or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if at_log or at_eval or at_save:
            watch.check(scratch, saved)  # a non-finite loss is never logged, evaluated or saved
        # log
        if on_metrics is not None and info.is_main and at_log:
            loss = float(torch.stack(losses).double().mean())  # the one sync per log
            on_metrics(step, {"train/loss": loss, "train/lr": lr})
            losses = []
        # evaluate
        stop = False
        if at_eval:
            if info.is_main:
                final = evaluate(model, val_set, device=device, loader=val_loader)
                training_mode(model, cfg.bert_dropout)  # evaluate restores train() everywhere
                if best is not None:
                    best.update(step, final.metrics, {"model": model})
                if on_metrics is not None:
                    on_metrics(step, {f"val/{k}": v for k, v in final.metrics.items() if k != "count"})
            stop = best is not None and stop_all(best.exhausted())
            distributed.barrier()
        # save
        if at_save:
            save(step)
            saved = step
            distributed.barrier()
        if step == end or stop:  # stop: no better val oIoU for cfg.patience evaluations
            break
    if final is None and val_set is not None and step == cfg.steps and info.is_main:
        final = evaluate(model, val_set, device=device, loader=val_loader)  # resumed when done
        if best is not None:
            best.update(step, final.metrics, {"model": model})
    final, selected = keep_best(best, final, step, {"model": model}) if info.is_main else (final, None)
    return LoopResult(
        steps=step,
        resumed_from=start,
        seconds=time.perf_counter() - t0,
        final_eval=final,
        selected_step=selected,
    )
