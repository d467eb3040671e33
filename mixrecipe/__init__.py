"""mixrecipe: mixup training, done right and done fast.

The public API lives here and nothing else. Importing mixrecipe imports neither timm nor fastai.

Note: ``mixrecipe.mixup`` is the op (a function). The module that holds the Mixup policy is also named
``mixup``; import from it with ``from mixrecipe.mixup import ...`` (or use the names re-exported here).
"""

from .loss import SoftTargetCrossEntropy, mixup_cross_entropy
from .mixup import (
    MixedBatch,
    MixParams,
    Mixup,
    box_lam,
    cutmix,
    cutmix_box_and_lam,
    rand_box,
    rand_box_minmax,
    random_involution,
    sample_beta,
)
from .ops import mix, mixup, mixup_target

__version__ = "0.1.0"

__all__ = [
    "MixParams",
    "MixedBatch",
    "Mixup",
    "SoftTargetCrossEntropy",
    "box_lam",
    "cutmix",
    "cutmix_box_and_lam",
    "rand_box",
    "rand_box_minmax",
    "random_involution",
    "sample_beta",
    "mix",
    "mixup",
    "mixup_cross_entropy",
    "mixup_target",
]
