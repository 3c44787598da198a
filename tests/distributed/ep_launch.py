"""Start ``nprocs`` worker processes the way ``torchrun`` does (env:// rendezvous on a free port).

Process start-up (importing torch) is the expensive part, so each spawned run packs several checks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, nprocs: int = 2, timeout: float = 120.0) -> list[str]:
    """Run ``tests/distributed/<script>`` on ``nprocs`` ranks; return each rank's stdout.

    Raises AssertionError with every rank's output when a rank fails or the run times out.
    """
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            LOCAL_WORLD_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / script), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=str(ROOT),
            )
        )
    outs, failed = [], []
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            failed.append(f"rank {rank} timed out after {timeout}s")
        if p.returncode != 0:
            failed.append(f"rank {rank} exited with {p.returncode}")
        outs.append(out)
    if failed:
        detail = "\n".join(f"--- rank {r} ---\n{o}" for r, o in enumerate(outs))
        raise AssertionError("; ".join(failed) + "\n" + detail)
    return outs
