"""The recipe schema: typed, nested dataclasses, read from YAML and ``key=value`` overrides.

A recipe is a YAML file whose keys are the command line's own names (``epochs``, ``mixup.alpha``,
``data.root``...). Values resolve in three layers: the embedded defaults below (which are the digits
recipe, so ``python -m mixrecipe.train`` with no argument trains something), then the YAML file, then
the overrides. Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key and
the closest valid ones; the command line turns that into exit status 2.

This module imports neither torch nor timm, so any engine (the torch loop, a fastai Learner) can share it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = [
    "RecipeError",
    "ConfigError",
    "Config",
    "DataConfig",
    "MixupConfig",
    "OptimConfig",
    "SchedConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "save_config",
    "list_keys",
    "format_help",
    "check_values",
    "DEFAULT_WORKERS",
]

# Loader worker processes per rank: more than the machine's cores only adds contention (torch warns).
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


class RecipeError(Exception):
    """A problem the user can fix (a bad key, a missing data set): reported without a traceback."""


class ConfigError(RecipeError, ValueError):
    """An unknown key or a value of the wrong type in a recipe or an override."""


def _f(default, help: str, choices: tuple | None = None, *, ge=None, gt=None, le=None, lt=None):
    """A dataclass field carrying its help line and, optionally, its allowed values: ``choices``, or bounds
    (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <) that every number of the value must keep."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    bounds = {op: b for op, b in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if b is not None}
    if bounds:
        meta["bounds"] = bounds
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = _f(
        "digits", "data set reader", ("digits", "fashion_mnist", "cifar10", "imagefolder")
    )
    root: str | None = _f(None, "where the data set lives (null: the reader's default location)")
    val_size: int = _f(
        0, "hold out this many training images (the first ones) for validation; 0: validate on the test set",
        ge=0,
    )
    img_size: int | None = _f(None, "image folders: training crop and evaluation size (null: 224)", ge=1)
    crop_pct: float = _f(0.875, "image folders: evaluation center-crop fraction (resize: img_size/crop_pct)",
                         gt=0, le=1)
    augment: str = _f(
        "none",
        "training augmentation: none, flip, crop_flip (pad + random crop + flip), rrc_flip "
        "(random-resized-crop + flip, image folders)",
        ("none", "flip", "crop_flip", "rrc_flip"),
    )
    pad: int = _f(4, "crop_flip: zero padding on each side before the random crop", ge=0)
    scale: list[float] = _f([0.08, 1.0], "rrc_flip: range of the cropped area fraction", gt=0, le=1)
    mean: list[float] | None = _f(None, "per-channel mean in [0, 1] units (null: the data set's usual one)")
    std: list[float] | None = _f(None, "per-channel std in [0, 1] units (null: the data set's usual one)",
                                 gt=0)
    workers: int = _f(DEFAULT_WORKERS, "image folders: data loader worker processes per rank", ge=0)
    decoder: str = _f(
        "torchvision", "image folders: torchvision (torchvision.io decodes JPEG/PNG/GIF/WebP in the loader "
        "workers, crop/flip on uint8 tensors), pil (PIL and timm's transforms) or device (torch engine: the "
        "workers read training JPEGs, the training device decodes a batch at a time and crops, resizes and "
        "flips it in one kernel)", ("torchvision", "pil", "device"),
    )
    on_device: bool | None = _f(
        None, "in-memory data sets: keep the training set on the training device as uint8 and make each "
        "batch there, gather + crop/flip + normalize + mix in one kernel (torch engine); null: on for CUDA "
        "when the set fits in a quarter of the free device memory"
    )
    skip_corrupt: bool = _f(
        False, "image folders: skip unreadable or corrupt files (counted in the log and summary) instead of "
        "stopping with an error naming the file"
    )
    train_subset: int = _f(0, "train on a random subset of this many images (0: all); seeded by data.seed",
                           ge=0)
    label_noise: float = _f(
        0.0, "replace this fraction of training labels by a different random class (seeded by data.seed)",
        ge=0, lt=1,
    )
    seed: int = _f(0, "seed of the data split, the subset and the label noise (fixed across runs)")


@dataclass
class MixupConfig:
    alpha: float = _f(0.2, "mixup Beta(alpha, alpha); 0 with cutmix_alpha 0 trains plain ERM", ge=0)
    cutmix_alpha: float = _f(0.0, "CutMix Beta(alpha, alpha); 0: off", ge=0)
    cutmix_minmax: list[float] | None = _f(None, "CutMix box size bounds, image fractions (overrides alpha)",
                                           gt=0, le=1)
    prob: float = _f(1.0, "probability of mixing a batch (or element)", ge=0, le=1)
    switch_prob: float = _f(0.5, "probability of CutMix instead of mixup when both are on", ge=0, le=1)
    mode: str = _f("batch", "one lam per batch, per pair or per element", ("batch", "pair", "elem"))
    pairing: str = _f(
        "flip", "partner of sample i: flip (B-1-i, in place) or random (a permutation)", ("flip", "random")
    )
    correct_lam: bool = _f(True, "CutMix: lam is the kept area after clipping the box")
    label_smoothing: float = _f(0.0, "label smoothing applied to the mixed targets", ge=0, lt=1)
    off_epoch: int = _f(0, "stop mixing from this epoch on (0: never)", ge=0)


@dataclass
class OptimConfig:
    opt: str = _f("adamw", "timm optimizer name (sgd is Nesterov in timm; momentum is plain SGD)")
    lr: float | None = _f(0.003, "learning rate (null: lr_base * global batch / lr_base_size)", ge=0)
    lr_base: float = _f(0.1, "learning rate for a global batch of lr_base_size", ge=0)
    lr_base_size: int = _f(256, "global batch size at which lr_base applies", ge=1)
    momentum: float = _f(0.9, "SGD momentum (optimizers without one ignore it)", ge=0, lt=1)
    weight_decay: float = _f(0.05, "weight decay", ge=0)
    eps: float | None = _f(None, "optimizer epsilon (null: the optimizer's default)", gt=0)
    filter_bias_and_bn: bool = _f(True, "exempt biases and norm weights from weight decay")


@dataclass
class SchedConfig:
    name: str = _f(
        "cosine",
        "learning-rate schedule, updated every step",
        ("cosine", "multistep", "step", "constant", "none"),
    )
    warmup_epochs: int = _f(
        0, "linear warm-up length in epochs, from its start (warmup_start_factor or warmup_lr) up to lr", ge=0
    )
    warmup_start_factor: float | None = _f(
        None, "warm-up start as a fraction of lr (the batch-scaled lr when optim.lr is null), so the warm-up "
        "rises at every batch size; null: start at warmup_lr", ge=0, le=1,
    )
    warmup_lr: float = _f(
        0.0, "absolute learning rate at the start of the warm-up (when warmup_start_factor is null); must "
        "not exceed lr", ge=0,
    )
    milestones: list[int] = _f([30, 60, 80], "multistep: epochs from which lr is multiplied by decay_rate",
                               ge=1)
    decay_epochs: int = _f(30, "step: decay every this many epochs", ge=1)
    decay_rate: float = _f(0.1, "multistep/step: lr multiplier at each decay", gt=0)
    min_lr: float = _f(0.0, "cosine: final learning rate", ge=0)


@dataclass
class Config:
    model: str = _f("digits_cnn", "model name: one of mixrecipe.models or any timm model")
    pretrained: bool = _f(False, "timm models: start from pretrained weights")
    epochs: int = _f(30, "training epochs", ge=1)
    batch_size: int = _f(64, "batch size per process (the global batch is this times the world size)", ge=1)
    drop_last: bool = _f(True, "drop the last incomplete training batch")
    seed: int = _f(0, "seed of the model init, shuffling, augmentation and mixup")
    output: str | None = _f(None, "run directory (null: runs/<recipe name>)")
    resume: bool = _f(False, "continue the run in output from its last checkpoint")
    overwrite: bool = _f(False, "start over even if output holds a run, finished or not (its files are "
                         "replaced)")
    device: str = _f("auto", "auto (CUDA when available), cpu or cuda", ("auto", "cpu", "cuda"))
    amp: bool = _f(True, "CUDA: bf16 autocast")
    channels_last: bool | None = _f(None, "channels_last memory format (null: on CUDA only)")
    compile: bool = _f(False, "torch.compile the model")
    progress: bool = _f(True, "progress bar (only shown on a terminal)")
    preview: bool = _f(True, "write mixup_preview.png")
    engine: str = _f("torch", "training engine", ("torch", "fastai"))
    data: DataConfig = field(default_factory=DataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)

    @property
    def name(self) -> str:
        """The run's name: the last component of ``output``."""
        return os.path.basename(os.path.normpath(self.output)) if self.output else "run"


# ----------------------------------------------------------------------------------------------------
# Schema introspection


def _sections(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _leaves(cls, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every dotted key of ``cls`` mapped to (type, field)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = (tp, f)
    return out


def list_keys(include_private: bool = False) -> list[str]:
    """All valid dotted keys, in schema order."""
    return [k for k in _leaves(Config) if include_private or not k.rsplit(".", 1)[-1].startswith("_")]


def _suggest(key: str) -> list[str]:
    """Closest valid keys: spelling neighbours first, then keys with the same last component."""
    keys = list_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    leaf_close = [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
    seen = []
    for k in same_leaf + close + leaf_close:
        if k not in seen:
            seen.append(k)
    return seen[:4]


def _unknown(key: str, where: str) -> ConfigError:
    hint = _suggest(key)
    msg = f"unknown key '{key}'{where}"
    msg += f"; did you mean {', '.join(hint)}?" if hint else "; run with --help to list the valid keys"
    return ConfigError(msg)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, str(item))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise ConfigError."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key) if len(args) == 1 else value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # "30,60,80" from a command line
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # a single value for a one-element list
        if not isinstance(value, (list, tuple)):
            raise bad
        try:
            return [_coerce(v, item, key) for v in value]
        except ConfigError:
            raise bad from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _check_choice(value, fld: dataclasses.Field, key: str):
    choices = fld.metadata.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")


_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _check_bounds(value, fld: dataclasses.Field, key: str) -> None:
    """Every number of ``value`` (a number or a list of them) finite and within the field's bounds."""
    bounds = fld.metadata.get("bounds", {})
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise ConfigError(f"{key}: expected a finite number, got {v}")
        if not all(_OPS[op][1](v, b) for op, b in bounds.items()):
            rule = " and ".join(f"{_OPS[op][0]} {b:g}" for op, b in bounds.items())
            raise ConfigError(f"{key}: must be {rule}, got {v:g}")


def _check_pair(value: list | None, key: str) -> None:
    if value is not None and (len(value) != 2 or value[0] > value[1]):
        raise ConfigError(f"{key}: expected two numbers [min, max] with min <= max, got {value}")


def check_values(cfg: Config) -> Config:
    """Check every value of ``cfg`` against its allowed values and range, before anything is built.

    The one place values are checked: what the data loader, optimizer, schedule or policy would reject
    later (``batch_size=0``, a negative lr, ``momentum=1.5``, ``mixup.alpha=-1``...) stops here, with the
    key named, before the run directory is touched.

    Returns:
        ``cfg`` itself.

    Raises:
        ConfigError: naming the key, the rule and the value.
    """
    values = _flatten(config_to_dict(cfg, include_private=True))
    for key, (_, fld) in _leaves(Config).items():
        _check_choice(values[key], fld, key)
        _check_bounds(values[key], fld, key)
    _check_pair(cfg.data.scale, "data.scale")
    _check_pair(cfg.mixup.cutmix_minmax, "mixup.cutmix_minmax")
    if cfg.engine == "fastai" and cfg.data.decoder == "device":
        raise ConfigError("data.decoder=device is supported by engine=torch only: with engine=fastai set "
                          "data.decoder=torchvision")
    if cfg.engine == "fastai" and cfg.data.on_device:  # null (auto) means the loader there
        raise ConfigError("data.on_device=true is supported by engine=torch only: with engine=fastai set "
                          "data.on_device=null or false")
    return cfg


# ----------------------------------------------------------------------------------------------------
# Building, merging, saving


def config_to_dict(cfg: Config, include_private: bool = False) -> dict:
    """The config as a nested plain dict (what config.yaml holds)."""
    d = dataclasses.asdict(cfg)
    if not include_private:
        d = {k: v for k, v in d.items() if not k.startswith("_")}
    return d


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    sections = set(_sections(Config))
    for k, v in d.items():
        key = prefix + str(k)
        if isinstance(v, dict) and (not prefix and k in sections):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def config_from_dict(values: dict, base: Config | None = None, where: str = "") -> Config:
    """Merge a nested dict of values onto ``base`` (default: the embedded defaults), checking every key.

    Args:
        values: nested dict as read from YAML (``{"mixup": {"alpha": 1.0}}``); dotted keys are accepted too.
        base: config to start from.
        where: a phrase for error messages, such as " in recipes/x.yaml".

    Returns:
        A new, validated Config.
    """
    leaves = _leaves(Config)
    merged = config_to_dict(base or Config(), include_private=True)
    for key, value in _flatten(values).items():
        if key not in leaves:
            if key in _sections(Config):
                raise ConfigError(f"'{key}'{where} must be a mapping of its keys, got {value!r}")
            raise _unknown(key, where)
        tp, fld = leaves[key]
        value = _coerce(value, tp, key)
        _check_choice(value, fld, key)
        _set(merged, key, value)
    sub = {name: cls(**merged.pop(name)) for name, cls in _sections(Config).items()}
    return Config(**merged, **sub)


def _first_key(section: str) -> str:
    return next(k for k in list_keys() if k.startswith(section + ".")).split(".", 1)[1]


def _parse_override(item: str, leaves) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"expected key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key in _sections(Config):
        raise ConfigError(f"'{key}' is a section: set its keys, such as {key}.{_first_key(key)}=...")
    if key not in leaves:
        raise _unknown(key, " on the command line")
    tp, _ = leaves[key]
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = typing.get_args(tp) if union else (tp,)
    if str in args:
        # Strings stay verbatim (a path like 2024 must not turn into a number); null still means None.
        return key, None if (union and raw in ("null", "~")) else raw
    try:
        return key, yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        return key, raw


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings (dotted keys, YAML-typed values) on top of ``cfg``."""
    leaves = _leaves(Config)
    values: dict = {}
    for item in overrides:
        key, value = _parse_override(item, leaves)
        _set(values, key, value)
    return config_from_dict(values, base=cfg, where=" on the command line")


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(recipe: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Resolve a config: embedded defaults, then the recipe file, then the overrides.

    Args:
        recipe: path of a YAML recipe, or None for the embedded default (digits).
        overrides: ``key=value`` strings.

    Returns:
        The validated Config. ``output`` defaults to ``runs/<recipe file stem>``.

    Raises:
        ConfigError: unknown key, wrong type, or a value outside its choices or range
            (:func:`check_values`).
        RecipeError: the recipe file does not exist.
    """
    cfg = Config()
    stem = "digits"
    if recipe is not None:
        cfg = config_from_dict(_read_yaml(recipe), cfg, where=f" in {recipe}")
        stem = os.path.splitext(os.path.basename(recipe))[0]
    cfg = apply_overrides(cfg, list(overrides))
    if cfg.output is None:
        cfg.output = os.path.join("runs", stem)
    return check_values(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (loadable again as a recipe)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("# resolved config of this run; rerun with: python -m mixrecipe.train <this file>\n")
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


def format_help() -> str:
    """Usage text listing every key with its default and help line."""
    lines = [
        "usage: python -m mixrecipe.train [RECIPE.yaml] [key=value ...]",
        "",
        "Without a recipe it trains the embedded default (scikit-learn digits). Keys (default):",
    ]
    leaves = _leaves(Config)
    defaults = _flatten(config_to_dict(Config()))
    for key in list_keys():
        _, fld = leaves[key]
        default = yaml.safe_dump(defaults[key], default_flow_style=True).strip().removesuffix("\n...")
        default = default.removesuffix("...").strip()
        lines.append(f"  {key}={default}")
        lines.append(f"      {fld.metadata.get('help', '')}")
    return "\n".join(lines)
