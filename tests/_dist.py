"""Run a function in N local gloo processes for a test and collect what each rank returns.

``fn`` must be defined at module level in an importable module (a test module is fine): spawned processes
import it by name. Each process starts Python and imports torch (a few seconds), so put every check that
needs a process group into one function and spawn once per test module.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitssl.distributed import destroy_distributed, find_free_port, init_distributed


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # the machines running tests have few cores shared by everyone
    out = Path(out_dir)
    try:
        init_distributed(backend="gloo")
        result = fn(*args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        destroy_distributed()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Call ``fn(*args)`` in ``world_size`` processes joined in a gloo process group; return results by rank.

    Inside ``fn`` the group is initialised through ``vitssl.distributed.init_distributed`` from the
    launcher environment variables, so ``get_rank()`` and the collectives work. Results travel back through
    ``torch.save`` files, so they may hold tensors.

    Args:
        fn: module-level function to run on every rank.
        world_size: number of processes.
        args: positional arguments for ``fn`` (picklable).
        timeout_s: give up (and kill the processes) after this many seconds.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message), exited abnormally or timed out.
    """
    ctx = mp.get_context("spawn")
    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="vitssl_dist_") as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(fn, rank, world_size, port, args, out_dir), daemon=True)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        # Poll rather than join in order: when one rank fails the others block in a collective forever.
        while any(proc.is_alive() for proc in procs):
            if any(proc.exitcode not in (None, 0) for proc in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        timed_out = time.monotonic() > deadline
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()

        errors = [
            f"rank {rank}:\n{(Path(out_dir) / f'rank{rank}.err').read_text()}"
            for rank in range(world_size)
            if (Path(out_dir) / f"rank{rank}.err").exists()
        ]
        if errors:
            raise RuntimeError(f"{fn.__name__} failed in {len(errors)} rank(s):\n" + "\n".join(errors))
        if timed_out or any(proc.exitcode != 0 for proc in procs):
            codes = [proc.exitcode for proc in procs]
            why = f"timed out after {timeout_s:.0f} s" if timed_out else "exited abnormally"
            raise RuntimeError(f"{fn.__name__} {why} (exit codes by rank: {codes})")
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
