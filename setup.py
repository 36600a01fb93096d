"""The package list; everything else is in pyproject.toml.

``lightning_decent`` and its sub-packages are found on disk. ``conf/`` and ``recipes/`` are top-level
folders of the repository that ``[tool.setuptools.package-dir]`` maps to ``lightning_decent.conf`` and
``lightning_decent.recipes``; the config groups (``conf/<group>/``, YAML files only) are listed too so that
setuptools ships them as the package data they are (pyproject.toml cannot combine a package search
with extra packages).
"""

from pathlib import Path

from setuptools import find_packages, setup

CONFIG_GROUPS = sorted(
    d.name
    for d in Path(__file__).parent.joinpath("conf").iterdir()
    if d.is_dir() and d.name.isidentifier() and not d.name.startswith("_")
)

setup(
    packages=[
        *find_packages(include=["lightning_decent", "lightning_decent.*"]),
        "lightning_decent.conf",
        *(f"lightning_decent.conf.{group}" for group in CONFIG_GROUPS),
        "lightning_decent.recipes",
    ]
)
