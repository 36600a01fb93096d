"""The package list; everything else is in pyproject.toml.

``lightning_decent`` and its sub-packages are found on disk; ``conf/`` and ``recipes/`` are top-level
folders of the repository that ``[tool.setuptools.package-dir]`` maps to ``lightning_decent.conf`` and
``lightning_decent.recipes`` (pyproject.toml cannot combine a package search with extra packages).
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["lightning_decent", "lightning_decent.*"]),
        "lightning_decent.conf",
        "lightning_decent.recipes",
    ]
)
