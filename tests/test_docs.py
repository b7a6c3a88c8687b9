"""The repository's own files: no empty logs committed; README.md and docs/ with every link, image, command
and script flag they show still working (the commands checked as the CLI checks them before any work)."""

import subprocess

from conftest import REPO


def tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def test_no_empty_log_files_are_committed():
    files = tracked() if (REPO / ".git").exists() else [str(p.relative_to(REPO)) for p in REPO.rglob("*.log")]
    empty = [f for f in files if f.endswith(".log") and (REPO / f).is_file() and (REPO / f).stat().st_size == 0]
    assert not empty, empty
