"""mixrecipe: mixup training, done right and done fast.

The public API lives here and nothing else. Importing mixrecipe imports neither timm nor fastai.
"""

from .loss import SoftTargetCrossEntropy, mixup_cross_entropy
from .ops import mix, mixup, mixup_target

__version__ = "0.1.0"

__all__ = [
    "SoftTargetCrossEntropy",
    "mix",
    "mixup",
    "mixup_cross_entropy",
    "mixup_target",
]
