"""Optional backend: SAM 2's ``SAM2AutomaticMaskGenerator`` (``pip install -e ".[sam2]"``).

The ``sam2`` package is published as source only; ``SAM2_BUILD_CUDA=0 pip install
--no-build-isolation sam2==1.1.0`` builds it without its CUDA extension (the extension only
post-processes small holes, and SAM 2 falls back when it is missing). The model config is a
name inside the package, e.g. ``configs/sam2.1/sam2.1_hiera_l.yaml``; the checkpoint is a
local path, checked against the model like SAM's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from semires.errors import SemiresError
from semires.proposals.base import file_sha256
from semires.proposals.sam import AutomaticMaskBackend, read_checkpoint

NAME = "sam2"


@dataclass(frozen=True)
class Sam2Settings:
    """``SAM2AutomaticMaskGenerator``'s keyword arguments with the library's defaults."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    use_m2m: bool = False
    multimask_output: bool = True


def _import_sam2() -> Any:
    try:
        from sam2 import automatic_mask_generator, build_sam
    except ImportError as e:
        raise SemiresError(
            f"proposals.backend = sam2 needs the optional sam2 package ({e}); install it with "
            '`SAM2_BUILD_CUDA=0 pip install --no-build-isolation -e ".[sam2]"`'
        ) from e
    return build_sam, automatic_mask_generator


class Sam2Backend(AutomaticMaskBackend):
    """``SAM2AutomaticMaskGenerator`` for model config ``config`` and ``checkpoint``."""

    name = NAME

    def __init__(
        self,
        config: str,
        checkpoint: str | Path,
        settings: Sam2Settings | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
    ) -> None:
        build_sam, amg = _import_sam2()
        self.precision = self.check_precision(precision)
        self.model_config = config
        self.checkpoint = Path(checkpoint)
        self.settings = settings or Sam2Settings()
        sd = read_checkpoint(self.checkpoint)
        try:
            model = build_sam.build_sam2(config, ckpt_path=None, device=str(device), mode="eval")
        except Exception as e:  # hydra raises its own types for an unknown config name
            raise SemiresError(
                f"proposals.sam2_config = {config!r}: not a SAM 2 model config ({type(e).__name__}); "
                "expected e.g. configs/sam2.1/sam2.1_hiera_l.yaml"
            ) from e
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if expected != got:
            bad = sorted(set(expected) ^ set(got)) or sorted(k for k in expected if expected[k] != got[k])
            raise SemiresError(
                f"{self.checkpoint}: checkpoint does not match SAM 2 config {config} "
                f"({len(bad)} names or shapes differ, e.g. {bad[0]}); use the config of the checkpoint's size"
            )
        model.load_state_dict(sd, strict=True)
        self._apply_precision(model, device)
        self.sha256 = file_sha256(self.checkpoint)
        self.generator = amg.SAM2AutomaticMaskGenerator(
            model, output_mode="binary_mask", **asdict(self.settings)
        )
        self.calls = 0

    def config(self) -> dict[str, Any]:
        return {
            "backend": NAME,
            "description": "sam2 SAM2AutomaticMaskGenerator",
            "model_config": self.model_config,
            "checkpoint_sha256": self.sha256,
            "precision": self.precision,
            "settings": dict(sorted(asdict(self.settings).items())),
        }
