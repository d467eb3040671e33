"""The command line: ``python -m mixrecipe.train [RECIPE] [key=value ...]``.

A recipe is a YAML file, or the bare name of one shipped inside the package (``cifar10``, ``imagenet``...:
the files of the repository's ``recipes/``, installed as ``mixrecipe.recipes``). Overrides win over the
YAML. Every problem the user can fix (a bad key or value, missing or unreadable data, an output directory
that cannot be written or that holds a run) ends with one line on stderr naming it and exit status 2, never
a traceback. A run that stops early says why and how to go on in one line, with an exit status of its own:
3 for a loss that is not finite, 4 for a data loader worker that died, 143 / 130 after SIGTERM / SIGINT
(the position inside the epoch saved for ``resume=true``).
"""

from __future__ import annotations

import os
import sys
from importlib import resources

from .config import RecipeError, format_help, load_config
from .lifecycle import RunStopped, run

__all__ = ["main", "resolve_recipe", "shipped_recipes"]


def _recipes_dir():
    return resources.files("mixrecipe.recipes")


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.name[:-5] for p in _recipes_dir().iterdir() if p.name.endswith(".yaml"))


def resolve_recipe(arg: str) -> str:
    """A recipe path as given, or a bare name such as ``cifar10`` looked up among the shipped recipes."""
    if os.path.isfile(arg):
        return arg
    folder = _recipes_dir()
    for name in (arg, f"{arg}.yaml"):
        candidate = folder / name
        if name.endswith(".yaml") and candidate.is_file():
            return str(candidate)  # a real file: the package is installed as files (wheel or editable)
    known = shipped_recipes()
    hint = f" (shipped recipes: {', '.join(known)})" if known else ""
    raise RecipeError(f"recipe file not found: {arg}{hint}")


def main(argv: list[str] | None = None) -> dict | None:
    """Command-line entry point: parse ``[RECIPE] [key=value ...]`` and train.

    Returns:
        The final metrics, or None for ``--help``.

    Raises:
        SystemExit: status 2 for a bad recipe, key, value, output directory or missing or unreadable data
            (one line on stderr); 3 for a loss that is not finite; 4 for a dead data loader worker;
            143 / 130 for a run stopped by SIGTERM / SIGINT (Ctrl-C) and saved for resume=true.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(format_help())
        return None
    positional = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    try:
        dashed = [a for a in positional if a.startswith("-")]
        if dashed:
            raise RecipeError(f"options are written key=value (e.g. epochs=2), got {dashed[0]}; see --help")
        if len(positional) > 1:
            raise RecipeError(f"expected one recipe and key=value overrides, got {' '.join(positional)}")
        recipe = resolve_recipe(positional[0]) if positional else None
        cfg = load_config(recipe, overrides)
        return run(cfg)
    except RecipeError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunStopped as exc:  # every rank stopped at the same point: rank 0 says it once
        if os.environ.get("RANK", "0") == "0":
            print(f"{'error: ' if exc.error else ''}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_status) from None
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted; add resume=true to continue from the last finished epoch", file=sys.stderr)
        raise SystemExit(130) from None
