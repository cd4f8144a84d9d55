"""Command ``import-checkpoint``: an official LAVT / SemiRES checkpoint as a semires checkpoint.

Not a DVC stage: a lab's existing model (the LAVT authors' published weights, or a
``model_best_<id>.pth`` of the official SemiRES ``train.py`` / ``train_semi_*.py``) becomes a
file that ``semires evaluate`` scores, ``semires.train.load_model`` loads, and ``semires
train-semi`` continues from as the burn-in model of its label fraction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from semires.errors import SemiresError
from semires.model.build import count_parameters
from semires.model.official import import_official, label_percent
from semires.train import save_checkpoint
from stages.common import log, stage_command


@stage_command("import-checkpoint")
def import_checkpoint(
    official: Annotated[Path, typer.Argument(help="The official .pth file (e.g. model_best_refcoco.pth).")],
    bert_dir: Annotated[
        Path,
        typer.Option(
            "--bert-dir",
            help="save_pretrained folder of the BERT the model was trained with (config.json, vocab.txt).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="The semires checkpoint to write.")],
    image_size: Annotated[
        int, typer.Option("--image-size", help="Square input side the model runs at (the official 480).")
    ] = 480,
    percent: Annotated[
        float | None,
        typer.Option(
            help="Percent of labeled train images the model was trained on; `train-semi` then accepts it "
            "as the burn-in model of that fraction only. Default: the file's args.sup_percent, if any."
        ),
    ] = None,
    pwam_heads: Annotated[
        str | None,
        typer.Option(
            "--pwam-heads", help="PWAM heads per stage, a-b-c-d (LAVT's --mha). Default: the file's args.mha."
        ),
    ] = None,
) -> None:
    """Convert an official LAVT / SemiRES checkpoint (read without running pickled code)."""
    if not (64 <= image_size <= 2048 and image_size % 32 == 0):
        raise SemiresError(
            f"--image-size {image_size}: expected a multiple of 32 in [64, 2048] (Swin downsamples by 32)"
        )
    if percent is not None and not 0 < percent <= 100:
        raise SemiresError(f"--percent {percent:g}: expected a percentage in (0, 100], e.g. 1 or 10")
    imported = import_official(official, bert_dir, image_size=image_size, pwam_heads_override=pwam_heads)
    src, cfg = imported.source, imported.spec.config
    pct = percent if percent is not None else label_percent(src)
    meta = {
        "stage": "burn_in",  # train-semi continues from it like from a burn-in model
        "source": "official",
        "official_file": src.path.name,
        "official_layout": src.layout,
    }
    if src.epoch is not None:
        meta["official_epoch"] = src.epoch
    if pct is not None:
        meta["percent"] = pct
    save_checkpoint(out, spec=imported.spec, model=imported.model, step=0, meta=meta)
    sw = cfg.swin
    log(
        "import-checkpoint",
        f"{src.path.name} ({src.layout} layout): Swin embed {sw.embed_dim}, depths "
        f"{'-'.join(map(str, sw.depths))}, heads {'-'.join(map(str, sw.num_heads))}, window "
        f"{sw.window_size}; PWAM heads {'-'.join(map(str, cfg.pwam_heads))}; {cfg.image_size} px; "
        f"{count_parameters(imported.model) / 1e6:.2f} M parameters; dropped {len(imported.dropped)} "
        f"unused weight(s); label fraction {f'{pct:g}%' if pct is not None else 'not recorded'} -> {out}",
    )
