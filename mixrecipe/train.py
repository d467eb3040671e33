"""``python -m mixrecipe.train [RECIPE.yaml] [key=value ...]``: train a recipe (see ``mixrecipe.cli``).

Programmatic use: ``main(["cifar10", "epochs=1"])`` (the CLI, exit status 2 on a bad recipe) or
``run(load_config(...))`` (raises ``RecipeError``) return the final metrics as a dict.
"""

from .cli import main
from .lifecycle import run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()
