"""Stage ``train_semi``: teacher-student training from a burn-in model, one label fraction and
one method per stage.

Methods: ``iom`` / ``cpi`` refine the teacher's labels with the proposals (IoU-based optimal
matching / composite parts integration), ``raw`` trains on the teacher's labels as they are;
a ``_pwa`` suffix adds pixel-wise adjustment for the samples no proposal matches. The
method ``supervised`` is the fair control: the same burn-in model trained on for the same
steps, schedule and labeled batches, with no unlabeled data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from semires import annotations, distributed
from semires.atomic import atomic_path, write_json
from semires.data import ExpressionDataset, ViewConfig
from semires.errors import SemiresError
from semires.model.build import count_parameters
from semires.proposals.store import ProposalStore
from semires.refine import METHOD_FIELDS, RefineConfig
from semires.resize import NEAREST_RULES
from semires.semi import SemiConfig, UnlabeledDataset, train_semi
from semires.train import load_model, save_checkpoint, train_supervised
from stages.burn_in import MAX_BATCH, MAX_STEPS, check_keep, check_text_training, loop_config, read_labeled
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

STRATEGIES = {"iom": "iom", "cpi": "cpi", "raw": "none"}
CONTROL = "supervised"


def parse_method(method: str) -> tuple[str, bool] | None:
    """``cpi_pwa`` -> ("cpi", True); ``raw`` -> ("none", False); ``supervised`` -> None."""
    if method == CONTROL:
        return None
    base, _, suffix = method.partition("_")
    if base not in STRATEGIES or suffix not in ("", "pwa"):
        raise ValueError(method)
    return STRATEGIES[base], suffix == "pwa"


METHODS_HELP = "iom, iom_pwa, cpi, cpi_pwa, raw, raw_pwa or supervised (the fair control)"


# semi.refine.*: RefineConfig's constants (the method's name sets its strategy and PWA), each
# field, default and check defined once, in semires.refine
RefineParams = dataclasses.make_dataclass(
    "RefineParams",
    [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(RefineConfig)
     if f.name not in METHOD_FIELDS],
    frozen=True,
    namespace={"__post_init__": lambda self: RefineConfig(**dataclasses.asdict(self))},
)  # fmt: skip
AugmentParams = ViewConfig  # semi.augment.*: the views, defined in semires.data


@dataclasses.dataclass(frozen=True)
class SemiParams:
    """semi.*: teacher-student training (paper values where the tiny default allows)."""

    fractions: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    methods: list[str] = dataclasses.field(default_factory=lambda: ["cpi_pwa"])
    steps: int = 40000
    batch_size: int = 8  # labeled expressions per step and process
    unlabeled_batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 1e-2
    poly_power: float = 0.9
    # null: the rate reaches 0 at the last step | n: lr * (1 - step / n) ** poly_power, the official
    # LambdaLR (n = the loaders' lengths x epochs: never 0)
    lr_horizon: int | None = None
    class_weights: tuple[float, float] = (0.9, 1.1)
    no_decay: str = "official"  # official: backbone norms and position biases only | norms: every norm
    bert_layers: int | None = 10  # BERT encoder layers that train (official: 0-9); null: all of BERT
    bert_dropout: bool = True  # the official student's BERT trains with dropout (train mode)
    # the weights the stage writes: last (the last step's: nothing selected on val) | best_val (the
    # evaluation with the best val oIoU, as the official scripts keep; the teacher's in train_semi)
    keep: str = "last"
    patience: int | None = None  # best_val: stop after this many evaluations without a better one
    sup_weight: float = 1.0  # the supervised term's factor; the public IOM script's is 10, its CPI one's 1
    unsup_weight: float = 1.0  # lambda
    ema_rate: float = 0.9996  # per step
    refine: RefineParams = dataclasses.field(default_factory=RefineParams)
    augment: AugmentParams = dataclasses.field(default_factory=AugmentParams)
    # how proposals are resized to the input size: pil (PIL's NEAREST, as the ground truth:
    # lined up with the image) | torch (F.interpolate's nearest, as the official code)
    proposal_resize: str = "pil"
    quality_samples: int = 256  # unlabeled expressions scored for pseudo-label quality
    log_every: int = 10
    eval_every: int = 2000
    checkpoint_every: int = 500
    seed: int = 0
    num_workers: int | None = None  # DataLoader workers (one pool for both halves of a step); null: auto
    image_cache_mb: int = 128  # decoded images kept per dataset and loading process
    compile: str = "none"  # torch.compile of student and teacher: none | regional | full
    channels_last: bool = False  # convolution weights NHWC (faster convolutions on a GPU)

    def __post_init__(self) -> None:
        check_loader("semi", self.num_workers, self.image_cache_mb)
        check_speed("semi", self.compile)
        check(len(self.fractions) > 0, "semi.fractions", self.fractions, "expected at least one fraction")
        for i, f in enumerate(self.fractions):
            check(
                0 < f < 100,
                f"semi.fractions[{i}]",
                f,
                "expected a percent in (0, 100), one of split.fractions",
            )
        check(len(self.methods) > 0, "semi.methods", self.methods, f"expected a list of {METHODS_HELP}")
        for i, m in enumerate(self.methods):
            try:
                parse_method(m)
            except ValueError:
                check(False, f"semi.methods[{i}]", m, f"expected one of {METHODS_HELP}")
        check(len(set(self.methods)) == len(self.methods), "semi.methods", self.methods, "names repeat")
        check(1 <= self.steps <= MAX_STEPS, "semi.steps", self.steps, f"expected 1..{MAX_STEPS:,} steps")
        for key in ("batch_size", "unlabeled_batch_size", "log_every", "checkpoint_every"):
            check(getattr(self, key) >= 1, f"semi.{key}", getattr(self, key), "expected a positive integer")
        for key in ("batch_size", "unlabeled_batch_size"):
            check(
                getattr(self, key) <= MAX_BATCH, f"semi.{key}", getattr(self, key), f"expected 1..{MAX_BATCH}"
            )
        check(0 <= self.seed < 2**32, "semi.seed", self.seed, "expected a seed in [0, 2**32)")
        check(0 < self.lr < 1, "semi.lr", self.lr, "expected a learning rate in (0, 1)")
        check(0 <= self.weight_decay < 1, "semi.weight_decay", self.weight_decay, "expected [0, 1)")
        check(self.poly_power > 0, "semi.poly_power", self.poly_power, "expected a positive power")
        check(
            all(w > 0 for w in self.class_weights),
            "semi.class_weights",
            list(self.class_weights),
            "expected two positive weights [background, object]",
        )
        check_text_training("semi", self.no_decay, self.bert_layers)
        check(
            self.lr_horizon is None or self.lr_horizon >= self.steps,
            "semi.lr_horizon",
            self.lr_horizon,
            f"expected null (decay to 0 at the last step) or a step count >= semi.steps ({self.steps})",
        )
        check_keep("semi", self.keep, self.patience)
        check(self.sup_weight > 0, "semi.sup_weight", self.sup_weight, "expected a positive factor, e.g. 1")
        check(self.unsup_weight >= 0, "semi.unsup_weight", self.unsup_weight, "expected lambda >= 0")
        check(0 <= self.ema_rate <= 1, "semi.ema_rate", self.ema_rate, "expected a rate in [0, 1]")
        check(
            self.proposal_resize in NEAREST_RULES,
            "semi.proposal_resize",
            self.proposal_resize,
            "expected pil (as the ground truth) or torch (F.interpolate, as the official code)",
        )
        check(self.quality_samples >= 0, "semi.quality_samples", self.quality_samples, "expected >= 0")
        check(self.eval_every >= 0, "semi.eval_every", self.eval_every, "expected 0 (end only) or steps")

    def refine_config(self, method: str) -> RefineConfig:
        parsed = parse_method(method)
        strategy, pwa = parsed if parsed is not None else ("none", False)
        return RefineConfig(strategy=strategy, pwa=pwa, **dataclasses.asdict(self.refine))


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_key(method: str, p: SemiParams, labeled: list[int], anns: Path, burn_in: Path, store: Path) -> str:
    """Names the run's inputs: a resume continues only a run of the same inputs and params."""
    h = hashlib.sha256()
    params = dataclasses.asdict(p)
    for k in ("fractions", "methods", *LOADER_KEYS, *SPEED_KEYS):
        params.pop(k)
    h.update(json.dumps({"method": method, "params": params, "labeled": labeled}, sort_keys=True).encode())
    h.update(_file_md5(anns).encode())
    h.update(_file_md5(burn_in).encode())
    if parse_method(method) is not None:
        h.update(_file_md5(store / "zarr.json").encode())
    return h.hexdigest()[:16]


@stage_command("train-semi")
def train_semi_command(
    split_path: Annotated[Path, typer.Option("--split", help="data/split/<fraction>.json of `split`.")],
    burn_in_path: Annotated[Path, typer.Option("--burn-in", help="The burn-in checkpoint to start from.")],
    method: Annotated[str, typer.Option(help=METHODS_HELP)],
    out: Annotated[Path, typer.Option(help="Final checkpoint (student, with its teacher).")],
    live_dir: LiveOption,
    quality_path: Annotated[
        Path, typer.Option("--quality", help="Pseudo-label quality at the start and end (JSON metric).")
    ],
    proposals: Annotated[Path, typer.Option(help="The proposals store of `propose`.")] = Path(
        "data/proposals.zarr"
    ),
    anns_path: AnnsOption = Path("data/anns.json"),
    scratch_root: ScratchOption = Path(".scratch/train_semi"),
    resume: ResumeOption = False,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Train a student on labeled and SAM-refined pseudo-labeled data (or the fair control)."""
    sp = section(params, "semi", SemiParams)
    dp = section(params, "dataset", DatasetParams)
    try:
        parse_method(method)
    except ValueError:
        raise SemiresError(f"--method {method!r}: expected one of {METHODS_HELP}") from None
    with exclusive_run("train-semi", scratch_root, [out, live_dir, quality_path]):
        distributed.relaunch_under_torchrun()
        info = distributed.init()
        try:
            _train(info, split_path, burn_in_path, method, out, live_dir, quality_path, proposals, anns_path,
                   scratch_root, resume, sp, dp)  # fmt: skip
        finally:
            distributed.shutdown()


def _train(info, split_path, burn_in_path, method, out, live_dir, quality_path, proposals, anns_path,
           scratch_root, resume, sp: SemiParams, dp: DatasetParams) -> None:  # fmt: skip
    percent, labeled_ids = read_labeled(split_path)
    anns = annotations.load(anns_path)
    spec, model, ckpt = load_model(burn_in_path)
    if ckpt.teacher is not None or ckpt.meta.get("stage") != "burn_in":
        raise SemiresError(f"{burn_in_path}: not a burn-in checkpoint; pass data/burn_in/<fraction>/model.pt")
    if ckpt.meta.get("percent") is not None and float(ckpt.meta["percent"]) != percent:
        raise SemiresError(
            f"{burn_in_path}: trained on {ckpt.meta['percent']:g}% labels, but {split_path} is {percent:g}%; "
            "pass the burn-in of the same fraction"
        )
    train_refs = anns.in_split("train")
    labeled = set(labeled_ids)
    lab_refs = [r for r in train_refs if r.image_id in labeled]
    unl_refs = [r for r in train_refs if r.image_id not in labeled and r.sentences]
    if not any(r.sentences for r in lab_refs):
        raise SemiresError(
            f"{split_path}: none of its {len(labeled)} labeled images has a referring expression in "
            f"{anns_path}; the split was drawn from another annotation file: rerun `semires split`"
        )
    control = parse_method(method) is None
    if not control and not unl_refs:
        raise SemiresError(f"{split_path}: no unlabeled images at {percent:g}%; semi-supervised needs some")
    store = None if control else ProposalStore(proposals)  # missing or damaged: one message, before any work
    key = run_key(method, sp, labeled_ids, anns_path, burn_in_path, proposals)
    scratch = scratch_root / f"{method}-{split_path.stem}-{key}"
    tok = spec.make_tokenizer()
    size, tokens = spec.config.image_size, spec.config.max_tokens
    cache = sp.image_cache_mb
    labeled_set = ExpressionDataset(
        lab_refs, dp.image_dir, tok, image_size=size, max_tokens=tokens, cache_mb=cache
    )
    val_refs = anns.in_split("val")
    val_set = (
        ExpressionDataset(val_refs, dp.image_dir, tok, image_size=size, max_tokens=tokens, cache_mb=cache)
        if val_refs
        else None
    )
    ckpt_path = scratch / "last.pt"
    resuming = resume and ckpt_path.is_file()
    live = None
    if info.is_main:
        if not resuming:
            shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        live = open_live(scratch / "dvclive", resume=resuming, checkpoint=ckpt_path)
        log(
            "train_semi",
            f"{method} at {percent:g}%: {len(lab_refs)} labeled / {len(unl_refs)} unlabeled refs, "
            f"{count_parameters(model) / 1e6:.2f} M parameters, {sp.steps} steps on {info.device} "
            f"x {info.world_size} process(es)",
        )

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        if step == 0:  # the start's pseudo-label quality, kept for a resumed run's summary
            start_q = {k.removeprefix("pseudo/"): v for k, v in metrics.items() if k.startswith("pseudo/")}
            write_json(scratch / "quality_start.json", start_q)
        live.step = step
        for k, v in metrics.items():
            live.log_metric(k, v)
        live.make_summary()
        if "val/mIoU" in metrics:
            log(
                "train_semi",
                f"step {step}: val oIoU {metrics['val/oIoU']:.2f} mIoU {metrics['val/mIoU']:.2f}",
            )
        if "pseudo/raw_mIoU" in metrics:
            log(
                "train_semi",
                f"step {step}: pseudo-labels mIoU raw {metrics['pseudo/raw_mIoU']:.2f} -> refined "
                f"{metrics['pseudo/refined_mIoU']:.2f}, matched {metrics['pseudo/match_rate']:.1f}%",
            )

    hook = on_metrics if info.is_main else None
    start = time.perf_counter()
    quality: dict[str, dict[str, float]] = {}
    teacher = None
    if control:
        cfg = loop_config(sp)
        result = train_supervised(
            model, spec, labeled_set, val_set, cfg, scratch=ckpt_path, run_key=key, resume=resume,
            dist_info=info, on_metrics=hook,
        )  # fmt: skip
    else:
        rcfg = sp.refine_config(method)
        geometric, photometric = sp.augment.views()
        unl_set = UnlabeledDataset(
            unl_refs, dp.image_dir, tok, store, image_size=size, max_tokens=tokens,
            geometric=geometric, photometric=photometric, cache_mb=cache, proposal_rule=sp.proposal_resize,
        )  # fmt: skip
        quality_set = UnlabeledDataset(
            unl_refs, dp.image_dir, tok, unl_set.store, image_size=size, max_tokens=tokens, cache_mb=cache,
            proposal_rule=sp.proposal_resize,
        )  # fmt: skip
        n = len(quality_set)
        picks = sorted(random.Random(sp.seed).sample(range(n), min(n, sp.quality_samples)))
        cfg = loop_config(
            sp, SemiConfig, unlabeled_batch_size=sp.unlabeled_batch_size, refine=rcfg,
            sup_weight=sp.sup_weight, unsup_weight=sp.unsup_weight, ema_rate=sp.ema_rate,
        )  # fmt: skip
        result = train_semi(
            model, spec, labeled_set, unl_set, val_set, cfg, scratch=ckpt_path, run_key=key,
            resume=resume, dist_info=info, on_metrics=hook, quality_set=quality_set,
            quality_indices=picks,
        )  # fmt: skip
        teacher = result.teacher
        if result.start_quality is not None:
            quality["start"] = result.start_quality
        if result.final_quality is not None:
            quality["end"] = result.final_quality
    if not info.is_main:
        return
    live.end()
    if not control and "start" not in quality:  # resumed: the start was measured by the killed run
        prior = scratch / "quality_start.json"
        if prior.is_file():
            quality["start"] = json.loads(prior.read_text(encoding="utf-8"))
    val = result.final_eval.metrics if result.final_eval is not None else {}
    meta = {
        "stage": "train_semi",
        "method": method,
        "percent": percent,
        "steps": result.steps,
        "labeled_refs": len(lab_refs),
        "unlabeled_refs": len(unl_refs),
        "burn_in_step": ckpt.step,
    }
    if result.selected_step is not None:  # keep: best_val (val/* are then the teacher's)
        meta["selected_step"] = result.selected_step
    meta.update({f"val/{k}": float(v) for k, v in val.items()})
    save_checkpoint(out, spec=spec, model=model, step=result.steps, run_key=key, meta=meta, teacher=teacher)
    write_json(quality_path, {f"{method}/{percent:g}": quality})
    with atomic_path(live_dir, directory=True) as tmp:
        shutil.copytree(scratch / "dvclive", tmp, dirs_exist_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    q = ""
    if "start" in quality and "end" in quality:
        s, e = quality["start"], quality["end"]
        q = (
            f"; pseudo-label mIoU raw {s['raw_mIoU']:.1f} -> refined {s['refined_mIoU']:.1f} at the start, "
            f"{e['raw_mIoU']:.1f} -> {e['refined_mIoU']:.1f} at the end"
        )
    log(
        "train_semi",
        f"{method} at {percent:g}%: {result.steps} steps in {time.perf_counter() - start:.1f} s{resumed}; "
        f"val oIoU {val.get('oIoU', float('nan')):.2f} mIoU {val.get('mIoU', float('nan')):.2f}{q} -> {out}",
    )
