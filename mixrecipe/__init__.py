"""mixrecipe: mixup training, done right and done fast.

The public API lives here and nothing else. Importing mixrecipe imports neither timm nor fastai.
``mixrecipe.mixup`` is the op (a function); the Mixup policy lives in ``mixrecipe.policy``, so no public
name here shadows a submodule.
"""

from .loss import SoftTargetCrossEntropy, mixup_cross_entropy
from .ops import mix, mixup, mixup_target
from .policy import (
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
