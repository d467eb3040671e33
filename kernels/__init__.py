"""Triton kernels of mixrecipe and their thin launchers (installed as ``mixrecipe.kernels``).

Only torch and triton are imported here; validation and dispatch live in ``mixrecipe.ops``.
"""

from ._common import interpreting
from .mixup import mix_launch

__all__ = ["interpreting", "mix_launch"]
