"""The documents stay a manual and findings: README.md and bench/README.md keep to their length,
the pictures they show exist, and no tracked text speaks of how the work was organised (the
project's history is told by dates and commits)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Built from pieces so that this file's own text does not match them.
SESSION, ISSUE = "sess" + "ions?", "iss" + "ue"
PROCESS_WORDS = [re.compile(p, re.IGNORECASE) for p in (
    rf"\b{SESSION} \d",                          # a numbered work period
    rf"\b{SESSION} \d+ (to|and) \d+",
    rf"\b{ISSUE} #?\d",                          # a tracker's numbered item
    rf"\b(this|next|each|every|that|a later) {SESSION}\b",
    rf"\b{ISSUE}'s\b",
    "before it became a " + "manual",
)]


def tracked_text_files() -> list[Path]:
    """Every file git tracks that reads as UTF-8 text."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    files = []
    for name in filter(None, names):
        path = ROOT / name
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        files.append(path)
    return files


def test_no_tracked_text_speaks_of_how_the_work_was_organised():
    here = Path(__file__).resolve()
    found = []
    for path in tracked_text_files():
        if path.resolve() == here:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if any(p.search(line) for p in PROCESS_WORDS):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "process words in tracked files:\n" + "\n".join(found)


def test_the_patterns_catch_what_they_are_for():
    for text in ("as measured in " + "Sess" + "ion 12", "sess" + "ions 11 to 15",
                 "the " + "iss" + "ue 15 note", "see " + "iss" + "ue #3", "resumed each " + "session"):
        assert any(p.search(text) for p in PROCESS_WORDS), text
    for text in ('@pytest.fixture(scope="session")', "start_new_session=True", "session_start"):
        assert not any(p.search(text) for p in PROCESS_WORDS), text


@pytest.mark.parametrize("name, limit", [("README.md", 200), ("bench/README.md", 600)])
def test_documents_keep_to_their_length(name, limit):
    lines = (ROOT / name).read_text(encoding="utf-8").count("\n")
    assert lines < limit, f"{name} has {lines} lines, the limit is {limit}"


@pytest.mark.parametrize("name", ["README.md", "docs/results.md", "bench/README.md",
                                  "bench/probes/README.md"])
def test_pictures_and_local_links_exist(name):
    document = ROOT / name
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text(encoding="utf-8"))
    missing = [t for t in targets if "://" not in t and not (document.parent / t).exists()]
    assert not missing, f"{name} links to missing files: {missing}"
