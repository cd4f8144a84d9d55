"""How a LAVT runs fast on a GPU without computing another function: ``torch.compile`` and
channels-last convolutions, both applied in place, both opt-in (``burn_in.compile``,
``semi.compile``, ``*.channels_last`` in params.yaml).

Compilation (:func:`compile_model`):

- ``regional``: the repeated blocks are compiled one by one: Swin's blocks, patch embedding
  and mergings, PWAM and the language gates, BERT's layers, and the decoder. A block's
  graph is small and the same for every block of a stage (the parameters are inputs of the
  compiled code, not constants), so compilation is quick, a change of one block does not
  recompile the others, and a piece dynamo cannot trace costs one block's speed only.
- ``full``: the whole forward as one graph (more fusion across blocks, longer to compile).

Each compiled forward is bound to its module as an instance attribute (a method of the
module, so ``copy.deepcopy`` gives the copy its own binding: the EMA teacher made from a
compiled student runs its own weights). Nothing is wrapped: the state dict keeps its keys
(no ``_orig_mod.``), EMA and DDP see the same parameters. Shapes are static
(``dynamic=False``): a new batch size compiles once more, up to :data:`RECOMPILE_LIMIT`
variants per block; beyond that dynamo runs the block as it is.

Channels-last (:func:`use_channels_last`): the convolution weights (Swin's patch embedding,
the decoder) are laid out NHWC, so cuDNN runs the convolutions NHWC without transposing
(its tensor cores' native layout in bf16), the patch embedding's output is already the
``B x H x W x C`` map Swin works on, and the decoder's inputs, the stage features, are NHWC
views already. Same arithmetic; the kernels may sum in another order.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

from semires.model.decoder import Decoder
from semires.model.pwam import LanguageGate, PixelWordAttention
from semires.model.swin import PatchEmbed, PatchMerging, SwinBlock

COMPILE_MODES = ("none", "regional", "full")
DEFAULT_BACKEND = "inductor"  # kernels generated for the device (minutes on a small CPU)
RECOMPILE_LIMIT = 64  # compiled variants (shapes, grad mode, train/eval) per block's forward
_REGIONS = (SwinBlock, PatchEmbed, PatchMerging, PixelWordAttention, LanguageGate, Decoder)


def _bert_layers(model: nn.Module) -> list[nn.Module]:
    text = getattr(model, "text", None)
    bert = getattr(text, "bert", None)
    encoder = getattr(bert, "encoder", None)
    return list(getattr(encoder, "layer", []))


def regions(model: nn.Module) -> Iterator[nn.Module]:
    """The modules ``regional`` compiles: every Swin block, patch embedding and merging,
    PWAM, language gate, BERT layer, and the decoder."""
    yield from (m for m in model.modules() if isinstance(m, _REGIONS))
    yield from _bert_layers(model)


@functools.cache
def _compiled(forward: Callable, backend: str) -> Callable:
    """One compiled function per class and backend, shared by its modules: dynamo keeps its
    variants per code object, so every block of a stage reuses one graph."""
    return torch.compile(forward, backend=backend, dynamic=False)


def _compile_forward(module: nn.Module, backend: str) -> None:
    module.forward = types.MethodType(_compiled(type(module).forward, backend), module)


def is_compiled(module: nn.Module) -> bool:
    """True when :func:`compile_model` compiled ``module``'s own forward."""
    return isinstance(module.__dict__.get("forward"), types.MethodType)


def compile_model(model: nn.Module, mode: str, *, backend: str | None = None) -> nn.Module:
    """Compile ``model`` (a :class:`~semires.model.lavt.LAVT`) in place as ``mode`` says
    (:data:`COMPILE_MODES`; ``none`` leaves it alone) with the ``torch.compile`` backend
    ``backend`` (None: :data:`DEFAULT_BACKEND`; ``inductor`` generates kernels, ``aot_eager``
    and ``eager`` trace without code generation, for tests). Compilation itself happens at
    the first call of each shape. Returns ``model``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return model
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 16 * limit
    )
    targets = [model] if mode == "full" else list(regions(model))
    for module in targets:
        _compile_forward(module, backend or DEFAULT_BACKEND)
    return model


def uncompile(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_model`: every module runs its class's forward again."""
    for module in model.modules():
        if is_compiled(module):
            del module.forward
    return model


def use_channels_last(model: nn.Module) -> nn.Module:
    """Lay every convolution weight of ``model`` out channels-last (NHWC), in place; the
    parameters stay the same tensors' values, the state dict the same keys. Returns ``model``."""
    return model.to(memory_format=torch.channels_last)


def speed_up(model: nn.Module, *, compile: str = "none", channels_last: bool = False,
             backend: str | None = None) -> nn.Module:  # fmt: skip
    """Both settings of a training stage, channels-last first (compiled code then sees NHWC
    weights from the start). Returns ``model``."""
    if channels_last:
        use_channels_last(model)
    return compile_model(model, compile, backend=backend)
