"""The code blocks of README.md: every fenced block with its language, line and run marker, and the first
```python block of a ``## <heading>`` section (what the integration tests execute in process)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# A block the test leaves out carries this comment on the line just above its opening fence.
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<why>.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    lang: str  # the info string after the opening fence ("" for none)
    code: str
    line: int  # 1-based line of the opening fence
    section: str  # the last heading above it
    not_run: str | None  # the reason given in the marker above it, or None

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:40]
        return f"L{self.line}-{self.lang or 'text'}-{slug}"


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of README.md (or of ``text``), in order."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    out, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            lang, start, body = line[3:].strip(), i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"README.md: the block opened at line {start + 1} is never closed"
            marker = NOT_RUN.match(lines[start - 1].strip()) if start > 0 else None
            why = marker["why"] if marker else None
            out.append(Block(lang, "\n".join(body) + "\n", start + 1, section, why))
        i += 1
    return out


def snippet(heading: str) -> str:
    """The code of the first python block in the README section titled ``heading`` (level 2)."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    block = re.search(r"^```python\n(.*?)^```", match.group(1), flags=re.M | re.S)
    assert block, f"README.md section '{heading}' has no python block"
    return block.group(1)
