"""A real package: the wheel holds the recipes, and a non-editable install resolves a named recipe from a
directory outside the checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

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


def test_wheel_ships_the_recipes_and_resolves_them_installed(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("mixrecipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(n.rsplit("/", 1)[-1] for n in names if n.startswith("mixrecipe/recipes/")
                  and n.endswith(".yaml")) == shipped
    assert "mixrecipe/kernels/mixup.py" in names
    assert not [n for n in names if n.startswith(("recipes/", "kernels/"))]  # nothing at the top level

    site = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", RESOLVE, str(site)], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    path, data_name, known = run.stdout.split()
    assert Path(path).is_file() and data_name == "cifar10"
    assert known.split(",") == [name[:-5] for name in shipped]
