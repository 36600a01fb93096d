"""The README is a front page whose commands run as written, and the documentation's links resolve."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]*[./][^)#\s]*)(?:#[^)\s]*)?\)")  # a target with a dot or a slash: a path
SETUP = ('pip install -e ".[app]" && python -m lightning_decent.train', 'pip install -e ".[test]" && python -m pytest')


def runnable_blocks(text: str) -> list[str]:
    """The shell blocks that follow a ``<!-- runnable -->`` marker."""
    return re.findall(r"<!-- runnable -->\s*```bash\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_is_a_front_page_with_the_two_setup_commands_of_ci() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 350
    assert "```bash\n" + "\n".join(SETUP) + "\n```" in text
    assert SETUP[1] in (ROOT / ".ci" / "run").read_text()
    assert runnable_blocks(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_to_a_file_of_the_repository(page: Path) -> None:
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_cites_files_outside_the_repository(page: Path) -> None:
    assert not re.search(r"shared/research|\bseed 0\d\d\b", page.read_text())


def _fresh_copy(destination: Path) -> Path:
    """The repository's tracked and untracked-but-not-ignored files, as a fresh clone would have them."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    for name in listed.stdout.splitlines():
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.mark.slow
def test_the_readme_runnable_commands_run_from_a_fresh_copy_and_leave_only_outputs(tmp_path: Path) -> None:
    copy = _fresh_copy(tmp_path / "clone")
    before = {p.name for p in copy.iterdir()}
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTNING_DECENT_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    for block in runnable_blocks(README.read_text()):
        for command in filter(None, (line.strip() for line in block.splitlines())):
            proc = subprocess.run(
                ["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True, timeout=600
            )
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert {p.name for p in copy.iterdir()} - before <= {"outputs"}
