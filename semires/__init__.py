"""semires: semi-supervised referring expression segmentation with SAM-refined pseudo-labels.

The package is a library: importing it reads no file and knows no folder layout. The DVC
stages in ``stages/`` parse ``params.yaml``, call into it and write the outputs.

``from semires import load_model`` gives a trained model (:func:`semires.inference.load_model`);
torch and the model code are imported on that first use, not by ``import semires``.
"""

# No `from __future__ import annotations` here: it would bind `semires.annotations` to the
# __future__ feature, and `from semires import annotations` would return that, not the module.
from typing import TYPE_CHECKING, Any

from semires.errors import SemiresError

if TYPE_CHECKING:
    from semires.inference import load_model

__all__ = ["SemiresError", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from semires.inference import load_model

        return load_model
    raise AttributeError(f"module 'semires' has no attribute {name!r}")
