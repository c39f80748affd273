"""Every code block of the documentation runs as written (tests/docs_blocks.py has the
conventions): each ``python`` block alone in a fresh directory, under the launcher its
first line names (``# run: mpiexec -n 2``, ``# run: torchrun --standalone
--nproc_per_node 2``) with a hard timeout; each ``$`` line of a ``console`` block with
bash. And every benchmark table a page pulls in (the ``results-table`` directive,
docs/_ext/hpcqn_docs.py) is found in its committed result file, with every option an
``options-table`` describes declared by its class: the pages quote no number by hand."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from docs_blocks import Block, blocks

pytestmark = pytest.mark.slow  # every code block of the docs runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
DOCUMENTS = [*sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts),
             ROOT / "README.md"]
RUNNABLE = ("python", "console")
LIMIT = {"": 60, "mpiexec": 120, "torchrun": 120}  # seconds for one block, by launcher
BIN = Path(sys.executable).parent  # hpcqn, mpiexec and torchrun of this environment
# A clean launch: no variables of an outer launcher, one thread per process.
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "TORCHELASTIC_"))
       and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "GROUP_RANK", "ROLE_RANK")}
ENV.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "HPCQN_DEVICE": "cpu"})


def _runnable() -> list[Block]:
    return [b for path in DOCUMENTS for b in blocks(path, ROOT) if b.language in RUNNABLE]


BLOCKS = _runnable()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(block: Block, what: str, out: subprocess.CompletedProcess) -> str:
    return (f"{block.where}: {what} exited {out.returncode}\n--- stdout\n{out.stdout[-4000:]}"
            f"\n--- stderr\n{out.stderr[-4000:]}")


def _python(block: Block, directory: Path) -> None:
    script = directory / "block.py"
    script.write_text(block.text)
    launcher = block.launcher
    env = dict(ENV)
    if launcher and launcher[0] == "torchrun":
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
        command = [str(BIN / "torchrun"), *launcher[1:], str(script)]
    elif launcher:
        command = [*launcher, sys.executable, str(script)]
    else:
        command = [sys.executable, str(script)]
    limit = LIMIT[launcher[0] if launcher else ""]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=directory,
                         timeout=limit)
    assert out.returncode == 0, _report(block, " ".join(command), out)


def _console(block: Block, directory: Path) -> None:
    for name in ("jobs", "examples"):
        shutil.copytree(ROOT / name, directory / name)
    assert block.commands, f"{block.where}: a console block with no '$ ' line"
    for command in block.commands:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", command], capture_output=True,
                             text=True, env=ENV, cwd=directory, timeout=LIMIT["mpiexec"])
        assert out.returncode == 0, _report(block, command, out)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_block_runs(block: Block, tmp_path: Path) -> None:
    if block.language == "python":
        _python(block, tmp_path)
    else:
        _console(block, tmp_path)


def test_blocks_found() -> None:
    """The pages hold runnable blocks, and every launcher line names a known launcher."""
    assert len(BLOCKS) >= 20, [b.where for b in BLOCKS]
    for block in BLOCKS:
        if block.language == "python":
            block.launcher  # noqa: B018 - raises for an unknown launcher


DIRECTIVE = re.compile(r"^```\{(?P<name>results-table|options-table)\}\s*(?P<arg>\S+)\n"
                       r"(?P<body>(?:.*\n)*?)```$", re.MULTILINE)


def _directives(name: str) -> list[tuple[Path, str, dict[str, str], list[str]]]:
    found = []
    for path in DOCUMENTS:
        for match in DIRECTIVE.finditer(path.read_text()):
            if match.group("name") != name:
                continue
            options, content = {}, []
            for line in match.group("body").splitlines():
                option = re.match(r"^:([\w-]+):\s*(.*)$", line)
                if option:
                    options[option.group(1)] = option.group(2).strip().strip('"')
                elif line.strip():
                    content.append(line)
            found.append((path.relative_to(ROOT), match.group("arg"), options, content))
    return found


def test_results_tables_come_from_committed_files() -> None:
    """Every ``results-table`` names a committed file under benchmarks/results and finds
    its table, columns and rows there (as the Sphinx directive does)."""
    from hpcqn_docs import select, tables_after

    tables = _directives("results-table")
    assert tables, "no results-table in the docs"
    for page, relative, options, _ in tables:
        assert relative.startswith("benchmarks/results/"), (page, relative)
        text = (ROOT / relative).read_text()
        found = tables_after(text, options.get("heading"))
        index = int(options.get("table", 1))
        assert len(found) >= index, (page, relative, options)
        columns = options.get("columns")
        lines = select(found[index - 1],
                       None if columns is None else [c.strip() for c in columns.split(",")],
                       options.get("rows"))
        assert len(lines) >= 3, (page, relative, options)  # a header, its rule, a row


def test_options_tables_describe_declared_options() -> None:
    """Every ``options-table`` names a class whose declaration describes each option its
    body explains (the defaults on the page come from that declaration)."""
    import importlib

    from hpcqn import options

    tables = _directives("options-table")
    assert tables, "no options-table in the docs"
    for page, dotted, _, content in tables:
        module, _, name = dotted.rpartition(".")
        spec = options.declared(getattr(importlib.import_module(module), name))
        described = {line.partition(":")[0].strip() for line in content}
        assert described <= set(spec), (page, dotted, sorted(described - set(spec)))
