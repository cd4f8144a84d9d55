"""The paper's backend: segment-anything's ``SamAutomaticMaskGenerator`` (ViT-H / L / B).

The model is built without weights from segment-anything's registry, then the checkpoint is
read here with ``torch.load(weights_only=True)`` and checked against the model before it is
loaded, so that a missing file or a checkpoint of another model type is one clear message
instead of a pickle or a ``load_state_dict`` traceback. ``tiny`` is a randomly initialised
0.2 M-parameter SAM built from the same modules, for tests; it loads its checkpoint through
the same code.

Implementations of the generator (``implementation``): ``library`` calls
``SamAutomaticMaskGenerator.generate``; ``fast`` (the default) is
:class:`semires.proposals.sam_fast.FastMaskGenerator`, the same masks with the
post-processing on the model's device, and in bf16 the image encoder's attention through
``scaled_dot_product_attention``; ``fast-compiled`` adds ``torch.compile`` of the image
encoder and the mask decoder. In float32 ``fast`` and ``library`` return identical masks,
so the store does not record which made them; wherever the two can differ (bf16,
compiled networks) it does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semires.errors import SemiresError
from semires.proposals.base import Proposals, file_sha256

NAME = "sam"


@dataclass(frozen=True)
class SamSettings:
    """``SamAutomaticMaskGenerator``'s keyword arguments; defaults are the library's (the
    paper ran with them)."""

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


def build_tiny_sam(checkpoint: str | None = None) -> torch.nn.Module:
    """A randomly initialised SAM small enough for CPU tests (input 256 px, ~0.2 M params).

    ``checkpoint`` is accepted for the registry's signature and ignored: weights are loaded
    by :func:`load_sam`."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    del checkpoint
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=256,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=4,
            out_chans=32,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@torch.no_grad()
def object_like(model: torch.nn.Module, gain: float = 30.0) -> torch.nn.Module:
    """Shape a randomly initialised SAM's mask head (in place) so that its masks look like a
    trained SAM's to the post-processing; for tests and benchmarks without weights.

    At initialisation every mask is fine noise over the whole image: the decoder's two 2x2
    transposed convolutions print a periodic pattern into every embedding cell, so every
    box is the whole image (box NMS keeps one mask), and the logits stay within about
    +-0.3 (every stability score is 0). Here each transposed convolution uses its first
    kernel tap at all four positions, so that a mask follows the image's regions (as the
    random encoder's features do: boxes differ), and the last layer of each hypernetwork
    head is scaled by ``gain`` (logits of a few units: stability scores spread over
    [0, 1]). Same architecture and FLOPs; the weights stay random."""
    up = model.mask_decoder.output_upscaling
    for conv in (up[0], up[3]):
        conv.weight.copy_(conv.weight[:, :, :1, :1].expand_as(conv.weight))
    for mlp in model.mask_decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.mul_(gain)
    return model


def registry() -> dict[str, Callable[..., torch.nn.Module]]:
    """``model_type -> builder(checkpoint=None)``: segment-anything's ViTs plus ``tiny``."""
    from segment_anything import sam_model_registry

    return {
        "vit_h": sam_model_registry["vit_h"],
        "vit_l": sam_model_registry["vit_l"],
        "vit_b": sam_model_registry["vit_b"],
        "tiny": build_tiny_sam,
    }


MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a plain state dict, or one under a ``"model"`` key)."""
    if not path.is_file():
        raise SemiresError(
            f"{path}: SAM checkpoint not found (proposals.checkpoint); download it from "
            "https://github.com/facebookresearch/segment-anything#model-checkpoints or fix the path"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise SemiresError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "download the SAM checkpoint again"
        ) from e
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SemiresError(f"{path}: not a state dict of tensors; expected a SAM checkpoint")
    return dict(sd)


def load_sam(
    model_type: str,
    checkpoint: str | Path,
    builders: Mapping[str, Callable[..., torch.nn.Module]] | None = None,
) -> torch.nn.Module:
    """Build ``model_type`` and load ``checkpoint`` into it, checking names and shapes first."""
    builders = registry() if builders is None else builders
    if model_type not in builders:
        raise SemiresError(f"proposals.model_type = {model_type!r}: expected one of {', '.join(builders)}")
    path = Path(checkpoint)
    sd = read_checkpoint(path)
    with torch.device("meta"):  # names and shapes only: no memory, no random init
        expected = {k: tuple(v.shape) for k, v in builders[model_type](checkpoint=None).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what} {len(keys)} (e.g. {keys[0]}{extra(keys[0])})"
            for what, keys, extra in (
                ("missing", missing, lambda k: ""),
                ("unexpected", unexpected, lambda k: ""),
                ("wrong shape", wrong, lambda k: f": {got[k]} vs {expected[k]}"),
            )
            if keys
        )
        raise SemiresError(
            f"{path}: checkpoint does not match model type {model_type}: {detail}; "
            "set proposals.model_type to the checkpoint's type (sam_vit_h_* -> vit_h, sam_vit_l_* -> "
            "vit_l, sam_vit_b_* -> vit_b)"
        )
    model = builders[model_type](checkpoint=None)
    model.load_state_dict(sd, strict=True)
    return model.eval()


PRECISIONS = ("fp32", "bf16")
IMPLEMENTATIONS = ("fast", "fast-compiled", "library")
# The networks of each generator's model that run in bf16 with precision "bf16".
_BF16_MODULES = ("image_encoder", "mask_decoder", "sam_mask_decoder")


def _floats(x: Any) -> Any:
    """Every floating tensor in ``x`` (tensors, tuples, lists, dicts) as float32."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, tuple | list):
        return type(x)(_floats(v) for v in x)
    if isinstance(x, dict):
        return {k: _floats(v) for k, v in x.items()}
    return x


def run_in_bf16(module: torch.nn.Module, device_type: str) -> None:
    """Run ``module`` under bf16 autocast from now on; its outputs come back as float32, so
    the generator's own post-processing (thresholds, NumPy conversion) is unchanged."""
    forward = module.forward

    def bf16_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return _floats(forward(*args, **kwargs))

    module.forward = bf16_forward


def compile_module(module: torch.nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` ``module``'s forward in place (static shapes; hooks and wrappers put
    on ``module`` later stay outside the compiled code)."""
    module.forward = torch.compile(module.forward, backend=backend, dynamic=False)


def sam_generator(
    model: torch.nn.Module,
    settings: SamSettings,
    *,
    precision: str = "fp32",
    implementation: str = "fast",
    compile_backend: str = "inductor",
) -> Callable[[np.ndarray], Proposals]:
    """``image -> Proposals`` for a SAM ``model`` (which this sets up in place: bf16
    autocast, fused attention, compilation, as asked) and generator ``settings``.

    ``implementation``: see the module docstring. ``min_mask_region_area > 0`` needs
    OpenCV's hole filling on the host, which only the library's generator does: with it
    every implementation is the library's. ``compile_backend``: the ``torch.compile``
    backend of ``fast-compiled`` (tests use ``eager``: graph capture without code
    generation)."""
    from segment_anything import SamAutomaticMaskGenerator

    from semires.proposals.sam_fast import FastMaskGenerator, use_sdpa

    AutomaticMaskBackend.check_precision(precision)
    check_implementation(implementation)
    device_type = next(model.parameters()).device.type
    library = implementation == "library" or settings.min_mask_region_area > 0
    if not library and precision == "bf16":
        use_sdpa(model.image_encoder)
    if implementation == "fast-compiled":  # the decoder too: its time is mostly elementwise traffic
        compile_module(model.image_encoder, compile_backend)
        compile_module(model.mask_decoder, compile_backend)
    if precision == "bf16":
        for name in _BF16_MODULES:
            if isinstance(getattr(model, name, None), torch.nn.Module):
                run_in_bf16(getattr(model, name), device_type)
    if library:
        generator = SamAutomaticMaskGenerator(model, output_mode="binary_mask", **asdict(settings))
        return lambda image: records_to_proposals(generator.generate(image), image.shape[:2])
    return FastMaskGenerator(model, settings)


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise SemiresError(
            f"proposals.sam_implementation = {implementation!r}: expected one of {', '.join(IMPLEMENTATIONS)}"
        )
    return implementation


class AutomaticMaskBackend:
    """A backend around an automatic mask generator (SAM's or SAM 2's): one ``generate``
    call per image, counted in ``calls``.

    ``precision``: ``fp32`` (the paper's) or ``bf16``: the image encoder and the mask
    decoder under bf16 autocast (their outputs back in float32), on whatever device the
    model is. bf16 changes the masks a little (thresholds on predicted IoU and stability
    meet rounded values), so it is part of :meth:`config` and of the store's identity."""

    generator: Any
    calls: int = 0
    precision: str = "fp32"

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> Proposals:
        self.calls += 1
        return self._propose(image)

    def _propose(self, image: np.ndarray) -> Proposals:
        return records_to_proposals(self.generator.generate(image), image.shape[:2])

    @staticmethod
    def check_precision(precision: str) -> str:
        if precision not in PRECISIONS:
            raise SemiresError(
                f"proposals.precision = {precision!r}: expected one of {', '.join(PRECISIONS)}"
            )
        return precision

    def _apply_precision(self, model: torch.nn.Module, device: torch.device | str) -> None:
        if self.precision == "bf16":
            for name in _BF16_MODULES:
                if isinstance(getattr(model, name, None), torch.nn.Module):
                    run_in_bf16(getattr(model, name), torch.device(device).type)


class SamBackend(AutomaticMaskBackend):
    """SAM's automatic mask generation over a checked checkpoint, on ``device``:
    ``implementation`` ``fast`` (default), ``fast-compiled`` or ``library`` (see the module
    docstring)."""

    name = NAME

    def __init__(
        self,
        model_type: str,
        checkpoint: str | Path,
        settings: SamSettings | None = None,
        device: torch.device | str = "cpu",
        builders: Mapping[str, Callable[..., torch.nn.Module]] | None = None,
        precision: str = "fp32",
        implementation: str = "fast",
    ) -> None:
        self.precision = self.check_precision(precision)
        self.implementation = check_implementation(implementation)
        self.model_type = model_type
        self.checkpoint = Path(checkpoint)
        self.settings = settings or SamSettings()
        model = load_sam(model_type, self.checkpoint, builders).to(device)
        self.sha256 = file_sha256(self.checkpoint)
        self.generate = sam_generator(
            model, self.settings, precision=precision, implementation=implementation
        )
        self.calls = 0

    def _propose(self, image: np.ndarray) -> Proposals:
        return self.generate(image)

    def config(self) -> dict[str, Any]:
        cfg = {
            "backend": NAME,
            "description": "segment-anything SamAutomaticMaskGenerator",
            "model_type": self.model_type,
            "checkpoint_sha256": self.sha256,
            "precision": self.precision,
            "settings": dict(sorted(asdict(self.settings).items())),
        }
        if self.precision != "fp32" or self.implementation == "fast-compiled":
            cfg["implementation"] = self.effective_implementation  # the masks depend on it
        return cfg

    @property
    def effective_implementation(self) -> str:
        """``implementation``, or ``library`` where the settings need the library's generator."""
        return "library" if self.settings.min_mask_region_area > 0 else self.implementation


def records_to_proposals(records: list[dict[str, Any]], size: tuple[int, int]) -> Proposals:
    """SAM's (and SAM 2's) ``binary_mask`` records -> :class:`Proposals` of ``size`` (H, W)."""
    h, w = size
    if not records:
        return Proposals.from_masks(np.zeros((0, h, w), bool))
    return Proposals(
        masks=np.stack([np.asarray(r["segmentation"], bool) for r in records]),
        predicted_iou=np.array([r["predicted_iou"] for r in records], np.float32),
        stability_score=np.array([r["stability_score"] for r in records], np.float32),
        area=np.array([r["area"] for r in records], np.float32),
        bbox=np.array([r["bbox"] for r in records], np.float32).reshape(-1, 4),
    )
