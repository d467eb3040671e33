"""The recipe schema: layering, overrides, typing, suggestions, saving, and the shipped recipes."""

from pathlib import Path

import pytest
import yaml

from mixrecipe.config import (
    Config,
    ConfigError,
    RecipeError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    format_help,
    list_keys,
    load_config,
    save_config,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_defaults_are_the_digits_recipe():
    cfg = load_config()
    assert cfg.data.name == "digits" and cfg.model == "digits_cnn"
    assert cfg.output == "runs/digits"
    # The shipped digits.yaml spells out the embedded default: the two must not drift apart.
    assert config_to_dict(load_config(str(RECIPES / "digits.yaml"))) == config_to_dict(cfg)


@pytest.mark.parametrize("name", ["digits", "cifar10", "imagenet", "fashion_mnist"])
def test_shipped_recipes_load_and_say_where_their_numbers_come_from(name):
    path = RECIPES / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#"), "each recipe opens with a comment header"
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert len(header.splitlines()) >= 3
    cfg = load_config(str(path))
    assert cfg.output == f"runs/{name}"


def test_paper_settings_are_what_the_recipes_hold():
    cifar = load_config(str(RECIPES / "cifar10.yaml"))
    assert (cifar.model, cifar.mixup.alpha, cifar.epochs) == ("preact_resnet18", 1.0, 200)
    assert cifar.batch_size == 128 and cifar.optim.opt == "momentum"
    assert (cifar.optim.lr, cifar.optim.weight_decay, cifar.sched.milestones) == (0.1, 1e-4, [100, 150])
    assert cifar.data.augment == "crop_flip" and cifar.data.pad == 4
    inet = load_config(str(RECIPES / "imagenet.yaml"))
    assert (inet.model, inet.mixup.alpha, inet.epochs) == ("resnet50", 0.2, 90)
    assert inet.optim.opt == "momentum" and inet.optim.momentum == 0.9 and inet.optim.weight_decay == 1e-4
    assert inet.optim.lr is None and inet.sched.warmup_epochs == 5 and inet.sched.milestones == [30, 60, 80]
    assert inet.data.augment == "rrc_flip"
    keras = load_config(str(RECIPES / "fashion_mnist.yaml"))
    assert (keras.model, keras.optim.opt, keras.batch_size, keras.epochs) == ("keras_cnn", "adam", 64, 10)
    assert (keras.mixup.alpha, keras.mixup.mode, keras.mixup.pairing) == (0.2, "elem", "random")
    assert keras.data.val_size == 2000 and keras.data.root == "/usr/share/datasets/fashion-mnist"


def test_overrides_win_over_yaml_and_are_typed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nmixup:\n  alpha: 0.4\n")
    cfg = load_config(str(recipe), ["epochs=2", "mixup.alpha=0", "sched.milestones=[3,6]",
                                    "data.root=/data/2024", "output=runs/x", "channels_last=null",
                                    "optim.lr=1e-3", "data.mean=0.5", "data.std=0.25,0.5,1"])
    assert cfg.epochs == 2 and cfg.mixup.alpha == 0.0 and isinstance(cfg.mixup.alpha, float)
    assert cfg.sched.milestones == [3, 6]
    assert cfg.data.root == "/data/2024"  # strings stay strings
    assert cfg.output == "runs/x" and cfg.channels_last is None
    assert cfg.optim.lr == 1e-3
    assert cfg.data.mean == [0.5] and cfg.data.std == [0.25, 0.5, 1.0]
    # The YAML's own value survives where no override touches it.
    assert load_config(str(recipe)).epochs == 7
    assert load_config(str(recipe)).output == "runs/r"


@pytest.mark.parametrize(
    "override, words",
    [
        ("mixup.alpah=1", ["mixup.alpah", "mixup.alpha"]),
        ("alpha=1", ["'alpha'", "mixup.alpha"]),
        ("lr=0.1", ["'lr'", "optim.lr"]),
        ("epoch=3", ["'epoch'", "epochs"]),
        ("data.nmae=cifar10", ["data.nmae", "data.name"]),
        ("mixup=1", ["section", "mixup."]),
    ],
)
def test_unknown_keys_name_the_closest_valid_ones(override, words):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [override])
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize(
    "override, words",
    [
        ("epochs=abc", ["epochs", "integer", "abc"]),
        ("epochs=1.5", ["epochs", "integer"]),
        ("resume=1", ["resume", "true/false"]),
        ("mixup.alpha=high", ["mixup.alpha", "number"]),
        ("mixup.mode=bach", ["mixup.mode", "batch"]),
        ("data.name=cifar", ["data.name", "cifar10"]),
        ("sched.milestones=[a,b]", ["sched.milestones", "a list of integers"]),
        ("epochs", ["key=value"]),
    ],
)
def test_wrong_types_and_choices_are_refused(override, words):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [override])
    for w in words:
        assert w in str(info.value)


def test_yaml_errors(tmp_path):
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text("mixup:\n  alhpa: 0.3\n")
    with pytest.raises(ConfigError, match=r"mixup\.alhpa.*k\.yaml.*mixup\.alpha"):
        load_config(str(bad_key))
    bad_type = tmp_path / "t.yaml"
    bad_type.write_text("batch_size: many\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(str(bad_type))
    not_a_map = tmp_path / "l.yaml"
    not_a_map.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(not_a_map))
    section = tmp_path / "s.yaml"
    section.write_text("data: cifar10\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(section))
    with pytest.raises(RecipeError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned > %s']\n" % (tmp_path / "pwned"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(evil))
    assert not (tmp_path / "pwned").exists()


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["epochs=3", "mixup.alpha=0.4", "data.mean=[0.1]", "output=somewhere"])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    again = load_config(str(path))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert set(yaml.safe_load(path.read_text())) == set(config_to_dict(cfg))


def test_the_shipped_config_holds_no_test_hooks():
    # Tests reach into a run with monkeypatching or a wrapper process (tests/test_train.py), not settings.
    assert list_keys(include_private=True) == list_keys()
    assert not [k for k in list_keys() if "kill" in k or "test" in k]


def test_dotted_keys_in_yaml_and_dict():
    cfg = config_from_dict({"mixup.alpha": 0.3, "optim": {"opt": "sgd"}})
    assert cfg.mixup.alpha == 0.3 and cfg.optim.opt == "sgd"
    with pytest.raises(ConfigError):
        config_from_dict({"optim": {"nope": 1}})


def test_help_lists_every_public_key():
    text = format_help()
    for key in list_keys():
        assert f"  {key}=" in text
    assert "mixup.alpha=0.2" in text


def test_default_loader_workers_fit_the_machine():
    import os

    from mixrecipe.config import DEFAULT_WORKERS, Config

    # At most 4 per rank, and never more than the machine has cores (2 on the CI machine, where 4 warned).
    assert Config().data.workers == DEFAULT_WORKERS == min(4, os.cpu_count() or 1)
