"""A real package: the wheel holds the recipes and kernels, a non-editable install resolves a named recipe
from a directory outside the checkout, and the default recipe runs from the checkout's root too (where
Python imports the checkout's ``mixrecipe/`` folder ahead of the installed copy)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

RESOLVE = """
import sys
import mixrecipe
from mixrecipe.cli import resolve_recipe, shipped_recipes
from mixrecipe.config import load_config
assert mixrecipe.__file__.startswith(sys.argv[1]), mixrecipe.__file__  # the installed copy, not the checkout
path = resolve_recipe("cifar10")
assert path.startswith(sys.argv[1]), path
print(path, load_config(path, []).data.name, ",".join(shipped_recipes()))
"""


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """(wheel, site): the project built as a wheel and installed with pip into a folder of its own."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("mixrecipe-*.whl")
    site = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    return wheel, site


def test_wheel_ships_the_recipes_and_resolves_them_installed(installed_wheel, tmp_path):
    wheel, site = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(n.rsplit("/", 1)[-1] for n in names if n.startswith("mixrecipe/recipes/")
                  and n.endswith(".yaml")) == shipped
    assert "mixrecipe/kernels/mixup.py" in names
    assert not [n for n in names if n.startswith(("recipes/", "kernels/"))]  # nothing at the top level

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", RESOLVE, str(site)], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    path, data_name, known = run.stdout.split()
    assert Path(path).is_file() and data_name == "cifar10"
    assert known.split(",") == [name[:-5] for name in shipped]


# `python -m mixrecipe.train` as a non-editable install runs it from the checkout's root: this test's venv
# holds an editable install, whose import hook would find the kernels by itself, so the child drops it first.
FROM_ROOT = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.argv = ["mixrecipe.train", *sys.argv[1:]]
runpy.run_module("mixrecipe.train", run_name="__main__", alter_sys=True)
"""


def test_default_recipe_runs_from_the_checkout_root_with_a_non_editable_install(installed_wheel, tmp_path):
    _, site = installed_wheel
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-c", FROM_ROOT, "epochs=1", "preview=false", f"output={out}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "test top-1:" in run.stdout and (out / "summary.json").is_file()
