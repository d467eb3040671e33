"""The files of a run directory: checkpoints, metrics.jsonl, summary.json, and the checks made on the
directory before a run starts. Every write goes to a temporary file first and is renamed into place, so a
kill at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .config import RecipeError

__all__ = [
    "CHECKPOINT_VERSION",
    "RUN_FILES",
    "save_checkpoint",
    "load_checkpoint",
    "append_metrics",
    "write_metrics",
    "write_summary",
    "UnwritableOutputError",
    "check_writable",
    "resume_point",
    "clear_run_files",
    "format_record",
]

CHECKPOINT_VERSION = 1
# What a run writes besides config.yaml; a fresh run in an old directory removes these first.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "curves.png", "mixup_preview.png",
             "reliability.png", "evaluation.json")


def save_checkpoint(state: dict, path: str) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write never leaves a torn checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def append_metrics(path: str, record: dict) -> None:
    """Add one epoch's record to metrics.jsonl."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def write_metrics(path: str, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the checkpoint's history (on resume: drops lines of a lost epoch)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in history:
            fh.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def write_summary(path: str, summary: dict) -> None:
    """Write the final metrics (summary.json)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


class UnwritableOutputError(RecipeError):
    """The run directory cannot be created or written; the message names it and the fix."""

    def __init__(self, out: str, reason: str):
        super().__init__(f"cannot write the run directory {out} ({reason}): pass output=DIR with a "
                         "directory you can create and write")


def check_writable(out: str) -> None:
    """Make sure ``out`` can be created and written, by doing it, and leave no trace when it did not exist.

    Raises:
        RecipeError: naming the directory and the fix (checked before any data is read or step taken).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise UnwritableOutputError(out, "it is a file")
    missing, parent = [], os.path.abspath(out)
    while not os.path.isdir(parent):  # the directories makedirs would create, deepest first
        missing.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    probe = os.path.join(out, f".write-test-{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise UnwritableOutputError(out, exc.strerror or type(exc).__name__) from None
    finally:
        for path in missing:  # a run that fails later must not leave empty directories behind
            try:
                os.rmdir(path)
            except OSError:
                break


def _describe_run(out: str) -> str | None:
    """What a run directory holds, in words (``a finished run (30/30 epochs)``), or None when it holds no
    run: only the files of a run that stopped before its first checkpoint (config.yaml, an empty
    metrics.jsonl, the preview) are no run worth keeping."""
    last = os.path.join(out, "last.pt")
    if os.path.isfile(last):
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)  # mmap: no tensor is read
        done, planned, step = state.get("epoch", 0), state.get("epochs", 0), state.get("step", 0)
        where = f", stopped at step {step}/{state.get('steps', '?')} of epoch {done + 1}" if step else ""
        return f"{'a finished' if done >= planned else 'an unfinished'} run ({done}/{planned} epochs{where})"
    metrics = os.path.join(out, "metrics.jsonl")
    kept = [name for name in ("best.pt", "summary.json") if os.path.isfile(os.path.join(out, name))]
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        kept.append("metrics.jsonl")
    return f"a run's {', '.join(kept)}" if kept else None


def resume_point(out: str, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint to resume from, or None for a fresh run.

    A fresh run never replaces what a directory holds, finished or not: without ``overwrite`` it refuses
    (nothing has been written yet when this is called).

    Raises:
        RecipeError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` was asked for; the
            message names the three ways on.
    """
    last = os.path.join(out, "last.pt")
    if resume and os.path.isfile(last):
        return last
    held = _describe_run(out) if os.path.isdir(out) else None
    if held is None or overwrite:
        if resume:
            print(f"note: no checkpoint in {out}; starting a new run", file=sys.stderr)
        return None
    if not os.path.isfile(last):  # nothing to resume from
        raise RecipeError(f"{out} holds {held}: pass overwrite=true to replace it, or output=DIR for a new "
                          "run")
    action = "report it again" if held.startswith("a finished") else "continue it"
    raise RecipeError(f"{out} holds {held}: pass resume=true to {action}, overwrite=true to start over "
                      "(its files are replaced), or output=DIR for a new run")


def clear_run_files(out: str) -> None:
    """Remove a previous run's outputs before a fresh run writes its own."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)


def format_record(record: dict, epochs: int) -> str:
    """One epoch's console line."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}",
             f"val_loss {record['val_loss']:.4f}", f"val_top1 {record['val_top1']:.2f}%",
             f"val_top5 {record['val_top5']:.2f}%"]
    if "val_ece" in record:
        parts.append(f"val_ece {record['val_ece']:.2f}%")
    if "train_fit_noisy" in record:
        parts.append(f"noisy fitted {record['train_fit_noisy']:.1f}%")
    parts += [f"lr {record['lr']:.3g}", f"{record['images_per_s']:,.0f} img/s", f"{record['seconds']:.1f}s"]
    return "  ".join(parts)
