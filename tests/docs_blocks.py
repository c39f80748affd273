"""The code blocks of the documentation's Markdown pages, as tests/test_docs.py runs them.

Conventions (docs/contributing.md says the same for authors):

- A fenced ``python`` block is a complete program: it runs as written, alone, in a fresh
  directory. Its first line may name a launcher, ``# run: mpiexec -n 2`` or
  ``# run: torchrun --nproc_per_node 2``; without one it runs as ``python``.
- A fenced ``console`` block holds commands that are cheap to run here: each line that
  starts with ``$ `` is run by bash from a directory that holds copies of the
  repository's ``jobs/`` and ``examples/``; the other lines show output and are not
  checked.
- Other blocks (``bash`` for commands that need a cluster, a network or a long time,
  ``toml``, ``text``, and MyST's ```` ```{code-block} python ```` for an excerpt of source
  that is not a program) are shown, not run.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
LAUNCHER = re.compile(r"^#\s*run:\s*(?P<command>.+?)\s*$")
LAUNCHERS = ("mpiexec", "torchrun")


@dataclass(frozen=True)
class Block:
    """One fenced block: the file, the line of its opening fence, its language and text."""

    path: Path
    line: int
    language: str
    text: str

    @property
    def launcher(self) -> list[str]:
        """The launcher a ``python`` block names on its first line (``[]``: plain python);
        ValueError for a launcher that is not mpiexec or torchrun."""
        first = self.text.split("\n", 1)[0]
        match = LAUNCHER.match(first)
        if not match:
            return []
        words = shlex.split(match.group("command"))
        if words[0] not in LAUNCHERS:
            raise ValueError(f"{self.where}: '# run:' names {words[0]!r}; use one of "
                             f"{LAUNCHERS}")
        return words

    @property
    def commands(self) -> list[str]:
        """The ``$ `` lines of a ``console`` block (a trailing backslash continues one)."""
        commands: list[str] = []
        pending = ""
        for line in self.text.splitlines():
            if pending:
                pending += "\n" + line
            elif line.startswith("$ "):
                pending = line[2:]
            else:
                continue
            if not pending.endswith("\\"):
                commands.append(pending)
                pending = ""
        if pending:
            commands.append(pending)
        return commands

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def blocks(path: Path, root: Path | None = None) -> list[Block]:
    """Every fenced block of the Markdown file ``path`` (its path shown relative to
    ``root``). MyST directives (```` ```{name} ````) are not code blocks and are skipped."""
    shown = path.relative_to(root) if root is not None else path
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info, start = match.group("fence"), match.group("info").strip(), i
        body: list[str] = []
        i += 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if (closing and closing.group("fence")[0] == fence[0]
                    and len(closing.group("fence")) >= len(fence)
                    and not closing.group("info").strip()):
                break
            body.append(lines[i])
            i += 1
        i += 1
        language = info.split()[0] if info else ""
        if not language.startswith("{"):
            found.append(Block(shown, start + 1, language, "\n".join(body) + "\n"))
    return found
