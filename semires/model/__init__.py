"""LAVT: language-aware vision transformer for referring expression segmentation.

Swin (LAVT's window arithmetic, timm's weight layout) run stage by stage with a pixel-word
attention module and a language gate after each stage, BERT (transformers) for the sentence,
and a decoder fusing the four scales: the function of the official LAVT / SemiRES model.
:func:`build.prepare` makes a model from a preset (loading local weights when the preset has
them); :func:`build.build_from_spec` rebuilds one from a checkpoint's :class:`build.ModelSpec`;
:func:`official.import_official` converts a checkpoint of the official code.
"""

from semires.model.build import PRESETS, ModelConfig, ModelSpec, build_from_spec, prepare
from semires.model.lavt import LAVT
from semires.model.official import import_official
from semires.model.text import TextTokenizer

__all__ = [
    "LAVT",
    "PRESETS",
    "ModelConfig",
    "ModelSpec",
    "TextTokenizer",
    "build_from_spec",
    "import_official",
    "prepare",
]
