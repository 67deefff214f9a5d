"""`ruff check .` is clean, with the rules pyproject.toml chooses (pyflakes, pycodestyle, import order, bugbear,
pyupgrade, unused noqa), and every `# noqa` says why beside it."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True)


def test_ruff_check_is_clean():
    result = ruff("check", ".", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_catch_what_they_are_chosen_for(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "bad.py").write_text("import sys\nimport os\n\n\ndef f(x=[]):\n    return undefined_name  # noqa\n")
    result = ruff("check", "--no-cache", "--output-format", "concise", ".", cwd=tmp_path)
    codes = set(re.findall(r": ([A-Z]+[0-9]+) ", result.stdout))
    # the unused import (F401), their order (I001), the mutable default (B006); the blanket noqa hides the undefined
    # name (F821) but not itself
    assert result.returncode == 1 and {"F401", "I001", "B006"} <= codes, result.stdout


def test_every_noqa_gives_its_reason():
    bare = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0].startswith("."):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = re.search(r"#\s*noqa(?::\s*[A-Z0-9, ]+)?(.*)$", line)
            if match and not re.search(r"\w", match.group(1)):
                bare.append(f"{path.relative_to(ROOT)}:{number}")
    assert bare == []
