"""The runnable snippets of README.md: the first ```python block of a ``## <heading>`` section."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet(heading: str) -> str:
    """The code of the first python block in the README section titled ``heading`` (level 2)."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    block = re.search(r"^```python\n(.*?)^```", match.group(1), flags=re.M | re.S)
    assert block, f"README.md section '{heading}' has no python block"
    return block.group(1)
