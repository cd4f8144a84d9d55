"""Stage ``propose``: mask proposals for every train image -> one sharded zarr store.

Runs as one process or, with ``SEMIRES_NPROC=N``, as N torchrun processes (gloo on CPU,
nccl on GPU). Shard ``k`` of the store belongs to process ``k % N``: it computes that
shard's images, keeps each finished one in the scratch folder, and writes the shard whole
once all its images are done. Process 0 then writes the mask counts and moves the store
onto ``--out``. A killed run resumes from the scratch folder, which is keyed by everything
that decides the masks (backend config, checkpoint hash, image list, layout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from tqdm import tqdm

from semires import annotations, distributed
from semires.atomic import atomic_path, write_json
from semires.errors import SemiresError
from semires.proposals import store
from semires.proposals.base import Backend, cap, file_sha256, read_image
from semires.proposals.sam import IMPLEMENTATIONS as SAM_IMPLEMENTATIONS
from semires.proposals.store import ImageResult, Layout, Scratch
from stages.common import DEFAULT_PARAMS, ParamsOption, exclusive_run, log, stage_command
from stages.params import DatasetParams, check, section

PROPOSAL_BACKENDS = ("felzenszwalb-multiscale", "sam", "sam2")
SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")


@dataclasses.dataclass(frozen=True)
class GeneratorParams:
    """SamAutomaticMaskGenerator's (and SAM2AutomaticMaskGenerator's) settings; SAM's defaults."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    def __post_init__(self) -> None:
        p = "proposals.generator"
        check(self.points_per_side >= 1, f"{p}.points_per_side", self.points_per_side, "expected >= 1")
        check(self.points_per_batch >= 1, f"{p}.points_per_batch", self.points_per_batch, "expected >= 1")
        for k in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            v = getattr(self, k)
            check(0 <= v <= 1, f"{p}.{k}", v, "expected a value in [0, 1]")
        check(
            0 <= self.crop_overlap_ratio < 1, f"{p}.crop_overlap_ratio", self.crop_overlap_ratio, "in [0, 1)"
        )
        check(self.crop_n_layers >= 0, f"{p}.crop_n_layers", self.crop_n_layers, "expected >= 0")
        check(
            self.crop_n_points_downscale_factor >= 1,
            f"{p}.crop_n_points_downscale_factor",
            self.crop_n_points_downscale_factor,
            "expected >= 1",
        )
        check(self.min_mask_region_area >= 0, f"{p}.min_mask_region_area", self.min_mask_region_area, ">= 0")


@dataclasses.dataclass(frozen=True)
class OfflineProposalParams:
    """The offline backend (felzenszwalb-multiscale): classical segmentation, not SAM."""

    scales: list[float] = dataclasses.field(default_factory=lambda: [50.0, 200.0, 800.0])
    sigma: float = 0.5
    min_area: int = 10
    group_scales: list[float] = dataclasses.field(default_factory=lambda: [50.0])
    colour_delta: float = 30.0
    dedupe_iou: float = 0.9
    max_group_share: float = 0.3

    def __post_init__(self) -> None:
        p = "proposals.offline"
        check(len(self.scales) > 0, f"{p}.scales", self.scales, "expected at least one scale")
        for i, s in enumerate(self.scales):
            check(s > 0, f"{p}.scales[{i}]", s, "expected a positive Felzenszwalb scale, e.g. 200")
        for i, s in enumerate(self.group_scales):
            check(s in self.scales, f"{p}.group_scales[{i}]", s, "expected one of proposals.offline.scales")
        check(self.sigma >= 0, f"{p}.sigma", self.sigma, "expected >= 0")
        check(self.min_area >= 1, f"{p}.min_area", self.min_area, "expected >= 1 pixel")
        check(self.colour_delta >= 0, f"{p}.colour_delta", self.colour_delta, "expected >= 0")
        check(0 < self.dedupe_iou <= 1, f"{p}.dedupe_iou", self.dedupe_iou, "expected a value in (0, 1]")
        check(0 < self.max_group_share <= 1, f"{p}.max_group_share", self.max_group_share, "in (0, 1]")


@dataclasses.dataclass(frozen=True)
class ProposalsParams:
    backend: str = "felzenszwalb-multiscale"
    model_type: str = "vit_h"
    checkpoint: str = "models/sam_vit_h_4b8939.pth"
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    sam2_checkpoint: str = "models/sam2.1_hiera_large.pt"
    precision: str = "fp32"  # sam/sam2: fp32 (the paper's) or bf16 (autocast: faster on GPUs)
    sam_implementation: str = "fast"  # sam: fast | fast-compiled | library (semires.proposals.sam)
    generator: GeneratorParams = dataclasses.field(default_factory=GeneratorParams)
    offline: OfflineProposalParams = dataclasses.field(default_factory=OfflineProposalParams)
    max_masks: int = 256
    shard_images: int = 64

    def __post_init__(self) -> None:
        check(
            self.backend in PROPOSAL_BACKENDS,
            "proposals.backend",
            self.backend,
            f"expected one of {', '.join(PROPOSAL_BACKENDS)}",
        )
        check(
            self.model_type in SAM_MODEL_TYPES,
            "proposals.model_type",
            self.model_type,
            f"expected one of {', '.join(SAM_MODEL_TYPES)} (tiny: a random test model)",
        )
        check(
            self.precision in ("fp32", "bf16"),
            "proposals.precision",
            self.precision,
            "expected fp32 (the paper's) or bf16",
        )
        check(
            self.sam_implementation in SAM_IMPLEMENTATIONS,
            "proposals.sam_implementation",
            self.sam_implementation,
            f"expected one of {', '.join(SAM_IMPLEMENTATIONS)}",
        )
        check(1 <= self.max_masks <= 4096, "proposals.max_masks", self.max_masks, "expected 1..4096")
        check(1 <= self.shard_images <= 4096, "proposals.shard_images", self.shard_images, "expected 1..4096")


def make_backend(p: ProposalsParams, device: Any) -> Backend:
    """The backend ``proposals.backend`` names, configured from params."""
    if p.backend == "sam":
        from semires.proposals.sam import SamBackend, SamSettings

        return SamBackend(
            p.model_type,
            p.checkpoint,
            SamSettings(**asdict(p.generator)),
            device=device,
            precision=p.precision,
            implementation=p.sam_implementation,
        )
    if p.backend == "sam2":
        from semires.proposals.sam2 import Sam2Backend, Sam2Settings

        return Sam2Backend(
            p.sam2_config, p.sam2_checkpoint, Sam2Settings(**asdict(p.generator)), device=device,
            precision=p.precision,
        )  # fmt: skip
    from semires.proposals.offline import FelzenszwalbMultiscale, OfflineSettings

    o = p.offline
    return FelzenszwalbMultiscale(
        OfflineSettings(
            scales=tuple(o.scales),
            sigma=o.sigma,
            min_area=o.min_area,
            group_scales=tuple(o.group_scales),
            colour_delta=o.colour_delta,
            dedupe_iou=o.dedupe_iou,
            max_group_share=o.max_group_share,
        )
    )


def _run_key(config: dict[str, Any], layout: Layout, files: dict[int, str]) -> str:
    doc = {
        "format": store.FORMAT,
        "version": store.VERSION,
        "config": config,
        "layout": layout.to_json(),
        "images": [[i, files[i], h, w] for i, h, w in layout.images],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@stage_command("propose")
def propose(
    images_path: Annotated[Path, typer.Option("--images", help="Train image list from `extract`.")] = Path(
        "data/train_images.json"
    ),
    out: Annotated[Path, typer.Option(help="The zarr store to write.")] = Path("data/proposals.zarr"),
    scratch: Annotated[
        Path, typer.Option(help="Folder for partial work (resumable; outside DVC's outs).")
    ] = Path(".scratch/propose"),
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Run the proposal backend on every train image (SEMIRES_NPROC processes) into one store."""
    p = section(params, "proposals", ProposalsParams)
    d = section(params, "dataset", DatasetParams)
    dataset, images = annotations.load_images(images_path)
    with exclusive_run("propose", scratch, [out]):
        distributed.relaunch_under_torchrun()
        info = distributed.init()
        if info.device.type == "cpu" and info.world_size > 1:  # share the cores, do not oversubscribe
            local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        try:
            _propose(dataset, images, p, Path(d.image_dir), out, scratch, info)
        finally:
            distributed.shutdown()


def _propose(
    dataset: str,
    images: dict[int, tuple[str, int, int]],
    p: ProposalsParams,
    image_dir: Path,
    out: Path,
    scratch_root: Path,
    info: distributed.DistInfo,
) -> None:
    start = time.perf_counter()
    main = info.is_main
    if not images:
        raise SemiresError(f"{dataset}: the annotations hold no train images to propose masks for")
    files = {i: f for i, (f, _, _) in images.items()}
    layout = Layout.build({i: (h, w) for i, (_, h, w) in images.items()}, p.max_masks, p.shard_images)

    backend = make_backend(p, info.device)
    config = backend.config()
    if main:
        what = config.get("description", config["backend"])
        log(
            "propose",
            f"backend {config['backend']}: {what}; {layout.num_images} train images, "
            f"{layout.num_shards} shards, {info.world_size} process(es) on {info.device}",
        )
    work = scratch_root / _run_key(config, layout, files)
    scratch = Scratch(work / "images")
    store_dir, marks, ready = work / "store.zarr", work / "shards", work / "store.ready"
    if main and not ready.is_file():
        shutil.rmtree(store_dir, ignore_errors=True)
        shutil.rmtree(marks, ignore_errors=True)
        store.create(store_dir, layout, config)
        marks.mkdir(parents=True, exist_ok=True)
        write_json(ready, {"created": True})
    distributed.barrier()

    error: SemiresError | None = None
    processed = capped = 0
    try:
        processed, capped = _my_shards(
            backend, p.max_masks, layout, image_dir, files, scratch, store_dir, marks, info
        )
    except SemiresError as e:
        error = e
    if not distributed.all_ok(error is None):
        if error is not None:
            raise error
        raise typer.Exit(2)  # another process failed and printed why
    processed, capped, calls = distributed.all_sum([processed, capped, getattr(backend, "calls", 0)])
    if not main:
        return

    counts, found = [], []
    for k in range(layout.num_shards):
        m = json.loads((marks / f"{k}.json").read_text())
        counts += m["num_masks"]
        found += m["found"]
    store.finish(store_dir, np.array(counts))
    with atomic_path(out, directory=True) as tmp:
        tmp.rmdir()
        try:
            os.replace(store_dir, tmp)
        except OSError:  # another file system
            shutil.copytree(store_dir, tmp)
    shutil.rmtree(work, ignore_errors=True)

    total = int(sum(counts))
    mask_bytes = sum(f.stat().st_size for f in (out / "masks").rglob("*") if f.is_file())
    all_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    over = sum(1 for n in found if n > p.max_masks)
    log(
        "propose",
        f"done: {layout.num_images} images ({processed} computed now, {calls} backend calls), {total} masks, "
        f"{total / layout.num_images:.1f} masks/image, {mask_bytes / max(total, 1):.0f} bytes/mask "
        f"({all_bytes / 1e6:.2f} MB in {sum(1 for f in out.rglob('*') if f.is_file())} files), "
        f"{over} images capped at {p.max_masks} masks, {time.perf_counter() - start:.1f} s -> {out}",
    )


def _my_shards(
    backend: Backend,
    max_masks: int,
    layout: Layout,
    image_dir: Path,
    files: dict[int, str],
    scratch: Scratch,
    store_dir: Path,
    marks: Path,
    info: distributed.DistInfo,
) -> tuple[int, int]:
    """Compute and write this process's shards; returns (images computed, images capped)."""
    mine = [k for k in layout.shards_of(info.rank, info.world_size) if not (marks / f"{k}.json").is_file()]
    todo: dict[int, list[int]] = {}
    for k in mine:
        ids = [layout.images[j][0] for j in layout.shard(k)]
        todo[k] = [i for i in ids if not _finished(scratch, i, image_dir / files[i])]
    n_todo = sum(len(v) for v in todo.values())
    n_mine = sum(len(layout.shard(k)) for k in layout.shards_of(info.rank, info.world_size))
    if info.is_main and n_todo < n_mine:
        log("propose", f"resuming: {n_mine - n_todo} of rank 0's {n_mine} images already done")
    bar = tqdm(
        total=n_todo,
        desc=f"propose (rank 0 of {info.world_size})",
        unit="img",
        disable=not info.is_main or not sys.stderr.isatty(),  # no bar in logs: errors stay one line
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    sizes = {i: (h, w) for i, h, w in layout.images}
    processed = capped = 0
    with bar:
        for k in mine:
            for image_id in todo[k]:
                h, w = sizes[image_id]
                path = image_dir / files[image_id]
                image, sha = read_image(path)
                if image.shape[:2] != (h, w):
                    raise SemiresError(
                        f"{path}: image is {image.shape[1]}x{image.shape[0]}, the annotations say {w}x{h}; "
                        "dataset.image_dir must hold the images the annotations were made from"
                    )
                props = backend(image)
                found = len(props)
                capped += found > max_masks
                scratch.save(image_id, ImageResult.from_proposals(cap(props, max_masks), found, sha))
                processed += 1
                bar.update(1)
            items = [scratch.load(layout.images[j][0]) for j in layout.shard(k)]
            store.write_shard(store_dir, layout, k, items)
            write_json(
                marks / f"{k}.json",
                {"num_masks": [r.num_masks for r in items], "found": [r.found for r in items]},
                indent=None,
            )
    return processed, capped


def _finished(scratch: Scratch, image_id: int, path: Path) -> bool:
    """The image has a scratch result made from this very file."""
    if not scratch.has(image_id):
        return False
    try:
        return scratch.source_sha256(image_id) == file_sha256(path)
    except (OSError, ValueError, KeyError):
        return False  # unreadable scratch or image: compute it (and report the image if bad)
