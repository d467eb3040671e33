"""The shipped training recipes (YAML), installed as the package ``mixrecipe.recipes``."""
