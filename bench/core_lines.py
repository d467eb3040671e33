"""Lines of code of the mixing and loss core, against its budget.

    python bench/core_lines.py            # a table per file and the total; exit 1 over the budget

A line of code is a line holding a Python token other than a comment, a docstring or the line break: blank
lines, comment lines and docstrings (of modules, classes and functions) are not counted. CI runs this.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The mixing and loss core: from the policy's draw to the kernels, and the loss.
CORE = ("mixrecipe/policy.py", "mixrecipe/draws.py", "mixrecipe/ops.py", "mixrecipe/checks.py",
        "mixrecipe/backend.py", "mixrecipe/reference.py", "mixrecipe/loss.py", "kernels/_common.py",
        "kernels/mixup.py", "kernels/cross_entropy.py")
BUDGET = 2200


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                                        ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstrings)


def main() -> int:
    rows = [(path, code_lines((ROOT / path).read_text()), len((ROOT / path).read_text().splitlines()))
            for path in CORE]
    total = sum(r[1] for r in rows)
    print(f"{'file':32s} {'code':>6s} {'lines':>6s}")
    for path, code, lines in rows:
        print(f"{path:32s} {code:6d} {lines:6d}")
    print(f"{'total':32s} {total:6d} {sum(r[2] for r in rows):6d}   budget {BUDGET} lines of code")
    if total > BUDGET:
        print(f"over budget by {total - BUDGET} lines of code", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
