"""Stage ``synth``: generate the embedded synthetic dataset in the REFER layout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from semires.atomic import atomic_path
from semires.synth import SynthOptions, write_dataset
from stages.common import DEFAULT_PARAMS, ParamsOption, log, stage_command
from stages.params import SynthParams, section


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
