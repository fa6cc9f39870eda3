"""The code of README.md, for the tests that run it: the "Recording in your training loop" section's Python
snippets by their first line (a comment naming the case) and the arguments of its `unlearn-ext` command; the
deletion workflow's shell lines and its Python twin."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict, List

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "#### Recording in your training loop"


WORKFLOW = "## Deletion requests: train, forget, forget, history"


def _section(heading: str = SECTION) -> str:
    text = README.read_text(encoding="utf-8")
    assert heading in text, f"README.md has no section {heading!r}"
    return re.split(r"\n#{2,4} ", text.split(heading, 1)[1], maxsplit=1)[0]  # up to the next heading


def workflow_lines() -> List[List[str]]:
    """The words of each line of the deletion workflow's shell block."""
    block = re.findall(r"```bash\n(.*?)```", _section(WORKFLOW), re.S)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def workflow_python() -> str:
    """The deletion workflow's Python twin."""
    return re.findall(r"```python\n(.*?)```", _section(WORKFLOW), re.S)[0]


def loop_snippets() -> Dict[str, str]:
    """``{case: code}`` of every Python block of the section; ``case`` is its first line without ``# ``."""
    blocks = re.findall(r"```python\n(.*?)```", _section(), re.S)
    return {block.splitlines()[0].lstrip("#").strip(): block for block in blocks}


def plan_command() -> List[str]:
    """The arguments of the section's ``unlearn-ext`` command (after the program name)."""
    (command,) = re.findall(r"```bash\n(.*?)```", _section(), re.S)
    words = shlex.split(command.replace("\\\n", " "))
    return words[words.index(next(w for w in words if w.endswith("unlearn-ext"))) + 1:]
