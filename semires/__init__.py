"""semires: semi-supervised referring expression segmentation with SAM-refined pseudo-labels.

The package is a library: importing it reads no file and knows no folder layout. The DVC
stages in ``stages/`` parse ``params.yaml``, call into it and write the outputs.
"""

from semires.errors import SemiresError

__all__ = ["SemiresError"]
__version__ = "0.1.0"
