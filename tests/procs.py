"""Running ``hpcqn`` in real processes (alone or under ``mpiexec``) and finding the rank
processes of an mpiexec launch (for tests that signal one rank)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec")
# One thread per rank; no Slurm variables from an outer allocation (hpcqn run checks them).
ENV = {k: v for k, v in os.environ.items() if k not in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")}
ENV.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})


def hpcqn(*args: str, ranks: int = 0, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m hpcqn ARGS`` in the repository, under ``mpiexec -n ranks`` when given."""
    command = [sys.executable, "-m", "hpcqn", *args]
    if ranks:
        command = [MPIEXEC, "-n", str(ranks), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=ENV)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    """The ``hpcqn run`` rank processes that descend from ``launcher``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == launcher.pid:
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            # "python -m hpcqn run ..." or "python /.../bin/hpcqn run ..." (not mpiexec's)
            is_python = b"python" in command[0].rsplit(b"/", 1)[-1]
            runs_hpcqn = any((word == b"hpcqn" or word.endswith(b"/hpcqn")) and nxt == b"run"
                             for word, nxt in zip(command, command[1:], strict=False))
            if not (is_python and runs_hpcqn):
                continue
            pid = int(entry.name)
            while pid > 1 and pid != launcher.pid:
                pid = _parent(pid)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if pid == launcher.pid:
            pids.append(int(entry.name))
    return sorted(pids)
