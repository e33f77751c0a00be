"""Only what pyproject.toml cannot say: the example configs live at the top level (configs/, so a clone's
`--config configs/quickstart.py` is a real file) and install as the package fxjax.configs (`--config quickstart`)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fxjax", "fxjax.*"]) + ["fxjax.configs"],
    package_dir={"fxjax.configs": "configs"},
)
