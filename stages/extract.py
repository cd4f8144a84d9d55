"""Stage ``extract``: REFER files -> one annotation file with COCO-RLE masks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from semires import annotations
from semires.refer import read_refer
from stages.common import DEFAULT_PARAMS, ParamsOption, log, stage_command
from stages.params import DatasetParams, section


@stage_command("extract")
def extract(
    out: Annotated[Path, typer.Option(help="Annotation file to write.")] = Path("data/anns.json"),
    images: Annotated[
        Path, typer.Option("--images", help="Train image list to write (what `propose` reads).")
    ] = Path("data/train_images.json"),
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Read the dataset's REFER files and write every ref with its sentences and mask (checking
    that every image file is there, of the size the annotations give)."""
    p = section(params, "dataset", DatasetParams)
    start = time.perf_counter()
    anns = read_refer(p.refer_root, p.name, p.split_by)
    checked = annotations.check_image_files(anns, p.image_dir)
    annotations.save(out, anns)
    annotations.save_images(images, anns, "train")
    log(
        "extract",
        f"{p.name}({p.split_by}) -> {out}; {checked} image files of the sizes the annotations say "
        f"({time.perf_counter() - start:.1f} s)",
    )
    for split, c in anns.counts_by_split().items():
        log("extract", f"  {split:>6}: {c.images:6d} images {c.refs:7d} refs {c.sentences:7d} sentences")
