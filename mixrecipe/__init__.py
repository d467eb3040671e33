"""mixrecipe: mixup training, done right and done fast.

The public API lives here and nothing else. Importing mixrecipe imports neither timm nor fastai.
``mixrecipe.mixup`` is the op (a function); the Mixup policy lives in ``mixrecipe.policy``, so no public
name here shadows a submodule.
"""

import os as _os

# kernels/ and recipes/ are top-level folders of the repository that an install places inside the package
# (mixrecipe.kernels, mixrecipe.recipes). Imported from a checkout's root while the package is installed
# without -e, Python picks this folder, which holds neither: look for them beside it, in a checkout only.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "kernels"))
        and _os.path.isfile(_os.path.join(_root, "pyproject.toml"))
        and _os.path.isfile(_os.path.join(_root, "kernels", "mixup.py"))):
    __path__.append(_root)
del _os, _root

from .loss import SoftTargetCrossEntropy, mixup_cross_entropy  # noqa: E402
from .ops import mix, mixup, mixup_target  # noqa: E402
from .policy import (  # noqa: E402
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
