"""Package-level promises: what importing mixrecipe does and does not pull in."""

import subprocess
import sys


def test_import_pulls_in_neither_timm_nor_fastai():
    code = (
        "import sys, mixrecipe, mixrecipe.kernels\n"
        "bad = [m for m in ('timm', 'fastai') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(sorted(mixrecipe.__all__))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mixup" in result.stdout


def test_public_api_names_resolve():
    import mixrecipe

    for name in mixrecipe.__all__:
        assert callable(getattr(mixrecipe, name)), name
