"""Stage ``burn_in``: supervised LAVT training on the labeled images of one label fraction."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from semires import annotations, distributed
from semires.atomic import atomic_path
from semires.data import ExpressionDataset
from semires.errors import SemiresError
from semires.model.build import ModelConfig, ModelSpec, count_parameters, prepare, preset
from semires.train import KEEP, NO_DECAY_RULES, LoopConfig, save_checkpoint, train_supervised
from stages.common import (
    DEFAULT_PARAMS,
    AnnsOption,
    LiveOption,
    ParamsOption,
    ResumeOption,
    ScratchOption,
    exclusive_run,
    log,
    open_live,
    stage_command,
)
from stages.params import LOADER_KEYS, SPEED_KEYS, DatasetParams, check, check_loader, check_speed, section


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """model.*: which LAVT and where its pretrained weights are (paper values by default)."""

    preset: str = "paper"
    image_size: int = 480
    max_tokens: int = 20
    swin_weights: str | None = None  # original Microsoft checkpoint (swin_base_..._22k.pth)
    bert_dir: str | None = None  # a `save_pretrained` bert-base-uncased (model + tokenizer)
    # Size overrides of the preset (null: the preset's own)
    embed_dim: int | None = None
    depths: tuple[int, int, int, int] | None = None
    num_heads: tuple[int, int, int, int] | None = None
    window_size: int | None = None
    decoder_hidden: int | None = None
    text_hidden: int | None = None
    text_layers: int | None = None
    pwam_heads: tuple[int, int, int, int] | None = None  # LAVT's --mha; the preset's: 1-1-1-1
    truncation: str | None = None  # lavt (the preset's: LAVT's cut) | keep_sep

    def __post_init__(self) -> None:
        from semires.model.build import PRESETS
        from semires.model.text import TRUNCATIONS

        check(self.preset in PRESETS, "model.preset", self.preset, f"expected one of {', '.join(PRESETS)}")
        check(
            64 <= self.image_size <= 2048 and self.image_size % 32 == 0,
            "model.image_size",
            self.image_size,
            "expected a multiple of 32 in [64, 2048] (Swin downsamples by 32)",
        )
        check(3 <= self.max_tokens <= 512, "model.max_tokens", self.max_tokens, "expected 3..512 tokens")
        for key in ("embed_dim", "window_size", "decoder_hidden", "text_hidden", "text_layers"):
            v = getattr(self, key)
            check(v is None or v >= 1, f"model.{key}", v, "expected a positive integer or null")
        for key in ("depths", "num_heads", "pwam_heads"):
            v = getattr(self, key)
            check(v is None or min(v) >= 1, f"model.{key}", v, "expected four positive integers or null")
        check(
            self.truncation is None or self.truncation in TRUNCATIONS,
            "model.truncation",
            self.truncation,
            f"expected null (the preset's) or one of {', '.join(TRUNCATIONS)}",
        )


MAX_STEPS = 100_000_000  # 2,500 times the paper's 40,000: a larger count is a typo, not a plan
MAX_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class BurnInParams:
    """burn_in.*: supervised training on the labeled images (paper values by default)."""

    steps: int = 40000
    max_epochs: float | None = None  # also stop after this many passes over the labeled refs
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 1e-2
    poly_power: float = 0.9
    # null: the rate reaches 0 at the last step | n: lr * (1 - step / n) ** poly_power, the official
    # LambdaLR (n = the loaders' lengths x epochs: never 0)
    lr_horizon: int | None = None
    class_weights: tuple[float, float] = (0.9, 1.1)
    no_decay: str = "official"  # official: backbone norms and position biases only | norms: every norm
    bert_layers: int | None = 10  # BERT encoder layers that train (official: 0-9); null: all of BERT
    bert_dropout: bool = False  # the official burn-in leaves BERT in eval mode (no dropout)
    # the weights the stage writes: last (the last step's: nothing selected on val) | best_val (the
    # evaluation with the best val oIoU, as the official scripts keep; the teacher's in train_semi)
    keep: str = "last"
    patience: int | None = None  # best_val: stop after this many evaluations without a better one
    log_every: int = 10
    eval_every: int = 2000  # 0: validate only at the end
    checkpoint_every: int = 500
    seed: int = 0
    num_workers: int | None = None  # DataLoader workers; null: auto (see check_loader)
    image_cache_mb: int = 128  # decoded images kept per dataset and loading process
    compile: str = "none"  # torch.compile: none | regional | full (semires.model.speed)
    channels_last: bool = False  # convolution weights NHWC (faster convolutions on a GPU)

    def __post_init__(self) -> None:
        check_loader("burn_in", self.num_workers, self.image_cache_mb)
        check_speed("burn_in", self.compile)
        check(self.steps >= 1, "burn_in.steps", self.steps, "expected at least 1 step")
        check(self.steps <= MAX_STEPS, "burn_in.steps", self.steps, f"expected 1..{MAX_STEPS:,} steps")
        check(
            self.max_epochs is None or 0 < self.max_epochs <= MAX_STEPS,
            "burn_in.max_epochs",
            self.max_epochs,
            "expected null (burn_in.steps alone) or a positive number of passes over the labeled refs",
        )
        check(self.batch_size >= 1, "burn_in.batch_size", self.batch_size, "expected a positive batch size")
        check(self.batch_size <= MAX_BATCH, "burn_in.batch_size", self.batch_size, f"expected 1..{MAX_BATCH}")
        check(0 <= self.seed < 2**32, "burn_in.seed", self.seed, "expected a seed in [0, 2**32)")
        check(0 < self.lr < 1, "burn_in.lr", self.lr, "expected a learning rate in (0, 1), e.g. 5e-5")
        check(
            0 <= self.weight_decay < 1,
            "burn_in.weight_decay",
            self.weight_decay,
            "expected a value in [0, 1)",
        )
        check(
            self.poly_power > 0, "burn_in.poly_power", self.poly_power, "expected a positive power, e.g. 0.9"
        )
        check(
            all(w > 0 for w in self.class_weights),
            "burn_in.class_weights",
            list(self.class_weights),
            "expected two positive weights [background, object], e.g. [0.9, 1.1]",
        )
        for key in ("log_every", "checkpoint_every"):
            check(
                getattr(self, key) >= 1,
                f"burn_in.{key}",
                getattr(self, key),
                "expected a positive step count",
            )
        check_text_training("burn_in", self.no_decay, self.bert_layers)
        check(
            self.lr_horizon is None or self.lr_horizon >= self.steps,
            "burn_in.lr_horizon",
            self.lr_horizon,
            f"expected null (decay to 0 at the last step) or a step count >= burn_in.steps ({self.steps})",
        )
        check_keep("burn_in", self.keep, self.patience)
        check(
            self.eval_every >= 0,
            "burn_in.eval_every",
            self.eval_every,
            "expected 0 (end only) or a step count",
        )


def check_text_training(section_name: str, no_decay: str, bert_layers: int | None) -> None:
    """The optimiser knobs burn_in and semi share: which parameters decay, which of BERT train."""
    check(
        no_decay in NO_DECAY_RULES,
        f"{section_name}.no_decay",
        no_decay,
        "expected official (no decay on the backbone's norms and position biases only) or norms "
        "(on every normalisation layer and position bias/embedding)",
    )
    check(
        bert_layers is None or 0 <= bert_layers <= 1000,
        f"{section_name}.bert_layers",
        bert_layers,
        "expected null (all of BERT trains) or how many of its first encoder layers train (official: 10)",
    )


def check_keep(section_name: str, keep: str, patience: int | None) -> None:
    """Which weights a training stage writes (burn_in and semi alike)."""
    check(
        keep in KEEP,
        f"{section_name}.keep",
        keep,
        "expected last (the last step's weights) or best_val (the best val oIoU's, as the official scripts)",
    )
    check(
        patience is None or (patience >= 1 and keep == "best_val"),
        f"{section_name}.patience",
        patience,
        "expected null, or with keep: best_val the evaluations without a better val oIoU before stopping",
    )


def model_config(p: ModelParams) -> ModelConfig:
    """The preset named by model.preset with the size overrides of model.* applied."""
    cfg = preset(p.preset, image_size=p.image_size, max_tokens=p.max_tokens)
    swin = dataclasses.replace(
        cfg.swin,
        **{
            k: v
            for k, v in {
                "embed_dim": p.embed_dim,
                "depths": p.depths,
                "num_heads": p.num_heads,
                "window_size": p.window_size,
            }.items()
            if v is not None
        },
    )
    text = cfg.text
    if text is not None:
        sizes = {"hidden_size": p.text_hidden, "num_layers": p.text_layers}
        text = dataclasses.replace(text, **{k: v for k, v in sizes.items() if v is not None})
    hidden = p.decoder_hidden if p.decoder_hidden is not None else cfg.decoder_hidden
    top = {"pwam_heads": p.pwam_heads, "truncation": p.truncation}
    return dataclasses.replace(
        cfg, swin=swin, text=text, decoder_hidden=hidden, **{k: v for k, v in top.items() if v is not None}
    )


def loop_config(p: Any, cls: type[LoopConfig] = LoopConfig, **extra: Any) -> LoopConfig:
    """``cls`` (LoopConfig or a subclass) from a params section with the loop's field names
    (burn_in.*, semi.*); ``extra`` sets the rest."""
    names = [f.name for f in dataclasses.fields(LoopConfig) if hasattr(p, f.name)]
    return cls(**{n: getattr(p, n) for n in names}, **extra)


def total_steps(p: BurnInParams, refs: int, world_size: int) -> int:
    """burn_in.steps, or fewer when burn_in.max_epochs passes over ``refs`` labeled refs (one
    random sentence each) end sooner: a few labeled images stop improving long before the
    step count that the full label set needs, and the learning rate still reaches zero."""
    if p.max_epochs is None:
        return p.steps
    per_step = p.batch_size * world_size
    return max(1, min(p.steps, math.ceil(p.max_epochs * refs / per_step)))


def read_labeled(path: Path) -> tuple[float, list[int]]:
    if not path.is_file():
        raise SemiresError(f"{path}: split file not found; run `semires split` (dvc repro split) first")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        percent, labeled = float(obj["percent"]), [int(i) for i in obj["labeled"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise SemiresError(
            f"{path}: not a split file of `semires split` ({e!r}); rerun the split stage"
        ) from e
    if not labeled:
        raise SemiresError(
            f"{path}: the labeled image list is empty, nothing to train on; "
            "rerun `semires split` (dvc repro split) or fix the file given in split.files"
        )
    return percent, labeled


def run_key(spec: ModelSpec, p: BurnInParams, labeled: list[int], anns_path: Path) -> str:
    """Names the run's inputs: a resume continues only a run of the same model, data and params."""
    h = hashlib.sha256()
    h.update(spec.fingerprint().encode())
    learning = {k: v for k, v in dataclasses.asdict(p).items() if k not in (*LOADER_KEYS, *SPEED_KEYS)}
    h.update(json.dumps(learning, sort_keys=True).encode())
    h.update(json.dumps(labeled).encode())
    h.update(hashlib.md5(anns_path.read_bytes()).hexdigest().encode())
    return h.hexdigest()[:16]


@stage_command("burn-in")
def burn_in(
    split_path: Annotated[Path, typer.Option("--split", help="data/split/<fraction>.json of `split`.")],
    out: Annotated[Path, typer.Option(help="Final checkpoint to write.")],
    live_dir: LiveOption,
    anns_path: AnnsOption = Path("data/anns.json"),
    scratch_root: ScratchOption = Path(".scratch/burn_in"),
    resume: ResumeOption = False,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Train LAVT on the labeled refs of one label fraction (AdamW, poly decay, weighted CE)."""
    mp = section(params, "model", ModelParams)
    bp = section(params, "burn_in", BurnInParams)
    dp = section(params, "dataset", DatasetParams)
    with exclusive_run("burn-in", scratch_root, [out, live_dir]):
        distributed.relaunch_under_torchrun()
        info = distributed.init()
        try:
            _train(info, split_path, out, live_dir, anns_path, scratch_root, resume, mp, bp, dp)
        finally:
            distributed.shutdown()


def _train(info, split_path, out, live_dir, anns_path, scratch_root, resume, mp, bp, dp) -> None:
    percent, labeled_ids = read_labeled(split_path)
    anns = annotations.load(anns_path)
    train_refs = anns.in_split("train")
    labeled = set(labeled_ids)
    refs = [r for r in train_refs if r.image_id in labeled]
    if not any(r.sentences for r in refs):
        raise SemiresError(
            f"{split_path}: none of its {len(labeled)} labeled images has a referring expression in "
            f"{anns_path}; the split was drawn from another annotation file: rerun `semires split`"
        )
    corpus = [s for r in train_refs for s in r.sentences]  # the vocabulary: every train sentence
    torch.manual_seed(bp.seed)  # the initial weights, like everything else, follow burn_in.seed
    spec, model = prepare(model_config(mp), swin_weights=mp.swin_weights, bert_dir=mp.bert_dir, corpus=corpus)
    key = run_key(spec, bp, labeled_ids, anns_path)
    scratch = scratch_root / f"{split_path.stem}-{key}"
    tok = spec.make_tokenizer()

    def dataset(rs):
        return ExpressionDataset(
            rs, dp.image_dir, tok, image_size=spec.config.image_size, max_tokens=spec.config.max_tokens,
            cache_mb=bp.image_cache_mb,
        )  # fmt: skip

    val_refs = anns.in_split("val")
    train_set, val_set = dataset(refs), (dataset(val_refs) if val_refs else None)
    steps = total_steps(bp, len(train_set.refs), info.world_size)
    if info.is_main:
        capped = f" (burn_in.max_epochs {bp.max_epochs:g} caps {bp.steps})" if steps < bp.steps else ""
        log(
            "burn_in",
            f"{percent:g}%: {len(refs)} labeled refs / {len(train_set)} expressions, "
            f"{spec.config.name} LAVT {count_parameters(model) / 1e6:.2f} M parameters, "
            f"{steps} steps{capped} x {bp.batch_size} x {info.world_size} process(es) on {info.device}",
        )
    cfg = loop_config(dataclasses.replace(bp, steps=steps))
    ckpt_path = scratch / "last.pt"
    resuming = resume and ckpt_path.is_file()
    live = None
    if info.is_main:
        if not resuming:
            shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        live = open_live(scratch / "dvclive", resume=resuming, checkpoint=ckpt_path)

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        live.step = step
        for k, v in metrics.items():
            live.log_metric(k, v)
        live.make_summary()
        if "val/mIoU" in metrics:
            log("burn_in", f"step {step}: val oIoU {metrics['val/oIoU']:.2f} mIoU {metrics['val/mIoU']:.2f}")
        elif step % (10 * bp.log_every) == 0:
            log("burn_in", f"step {step}: loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e}")

    start = time.perf_counter()
    result = train_supervised(
        model,
        spec,
        train_set,
        val_set,
        cfg,
        scratch=ckpt_path,
        run_key=key,
        resume=resume,
        dist_info=info,
        on_metrics=on_metrics if info.is_main else None,
    )
    if not info.is_main:
        return
    live.end()
    val = result.final_eval.metrics if result.final_eval is not None else {}
    meta = {"stage": "burn_in", "percent": percent, "steps": result.steps, "labeled_refs": len(refs)}
    if result.selected_step is not None:  # keep: best_val
        meta["selected_step"] = result.selected_step
    meta.update({f"val/{k}": float(v) for k, v in val.items()})
    save_checkpoint(out, spec=spec, model=model, step=result.steps, run_key=key, meta=meta)
    with atomic_path(live_dir, directory=True) as tmp:
        shutil.copytree(scratch / "dvclive", tmp, dirs_exist_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    log(
        "burn_in",
        f"{percent:g}%: {result.steps} steps in {time.perf_counter() - start:.1f} s{resumed}; "
        f"val oIoU {val.get('oIoU', float('nan')):.2f} mIoU {val.get('mIoU', float('nan')):.2f} -> {out}",
    )
