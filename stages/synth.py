"""Stage ``synth``: generate the embedded synthetic dataset in the REFER layout."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import typer

from semires.atomic import atomic_path
from semires.synth import SynthOptions, write_dataset
from stages.common import DEFAULT_PARAMS, ParamsOption, log, stage_command
from stages.params import check, section


@dataclasses.dataclass(frozen=True)
class SynthParams:
    num_images: int = 400
    image_size: tuple[int, int] = (96, 128)
    objects_per_image: tuple[int, int] = (2, 4)
    crowd_share: float = 0.15
    overlap_share: float = 0.3
    object_scale: float = 1.3
    split_shares: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.7, "val": 0.1, "testA": 0.1, "testB": 0.1}
    )
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.num_images >= 4, "synth.num_images", self.num_images, "need at least 4 images")
        lo, hi = self.image_size
        check(
            32 <= lo <= hi <= 4096,
            "synth.image_size",
            list(self.image_size),
            "expected [min, max] side in pixels with 32 <= min <= max",
        )
        lo, hi = self.objects_per_image
        check(
            1 <= lo <= hi <= 12,
            "synth.objects_per_image",
            list(self.objects_per_image),
            "expected [min, max] with 1 <= min <= max <= 12",
        )
        check(
            0.25 <= self.object_scale <= 2.5,
            "synth.object_scale",
            self.object_scale,
            "expected a factor in [0.25, 2.5] on the object radii",
        )
        for k in ("crowd_share", "overlap_share"):
            v = getattr(self, k)
            check(0 <= v <= 1, f"synth.{k}", v, "expected a share in [0, 1]")
        check(
            "train" in self.split_shares
            and all(v >= 0 for v in self.split_shares.values())
            and sum(self.split_shares.values()) > 0,
            "synth.split_shares",
            self.split_shares,
            "expected non-negative shares including train, "
            "e.g. {train: 0.7, val: 0.1, testA: 0.1, testB: 0.1}",
        )


@stage_command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="REFER root to write (dataset folder and images/).")] = Path(
        "data/refer"
    ),
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Generate the synthetic referring-expression dataset (the embedded default)."""
    p = section(params, "synth", SynthParams)
    opts = SynthOptions(
        num_images=p.num_images,
        image_size=p.image_size,
        objects=p.objects_per_image,
        split_shares=dict(p.split_shares),
        crowd_share=p.crowd_share,
        overlap_share=p.overlap_share,
        object_scale=p.object_scale,
        seed=p.seed,
    )
    start = time.perf_counter()
    with atomic_path(out, directory=True) as tmp:
        counts = write_dataset(tmp, opts)
    log(
        "synth",
        f"{counts['images']} images, {counts['annotations']} annotations, {counts['refs']} refs, "
        f"{counts['sentences']} sentences -> {out} ({time.perf_counter() - start:.1f} s)",
    )
