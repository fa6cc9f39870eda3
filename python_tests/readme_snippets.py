"""The code of the README and docs/usage.md, for the tests that run it: from README.md the deletion workflow's
shell lines and its Python twin, the exact tier's shell lines and the ops' snippet; from docs/usage.md the
"Recording in your training loop" section's Python snippets by their first line (a comment naming the case),
the arguments of its `unlearn-ext` command and what the section says it prints. Each section is named by its
page and heading, so a section that moves changes one constant here."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USAGE = ROOT / "docs" / "usage.md"

#: (page, heading) of each section whose code the tests run
SECTION = (USAGE, "### Recording in your training loop")
WORKFLOW = (README, "## Deletion requests: train, forget, forget, history")
EXACT = (README, "### The exact tier: replay instead of undo")
OPS = (README, "## The ops and the partial optimizers")


def _section(where: Tuple[Path, str] = SECTION) -> str:
    page, heading = where
    text = page.read_text(encoding="utf-8")
    assert heading in text, f"{page.relative_to(ROOT)} has no section {heading!r}"
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


def plan_printed() -> str:
    """What the section says its ``unlearn-ext`` command prints (its one ``text`` block)."""
    (printed,) = re.findall(r"```text\n(.*?)```", _section(), re.S)
    return printed


def exact_lines() -> List[List[str]]:
    """The words of each line of the exact tier's shell block."""
    block = re.findall(r"```bash\n(.*?)```", _section(EXACT), re.S)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def ops_snippet() -> str:
    """The README's snippet of the ops and the partial optimizers (its one Python block)."""
    (block,) = re.findall(r"```python\n(.*?)```", _section(OPS), re.S)
    return block
