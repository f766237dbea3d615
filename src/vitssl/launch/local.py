"""Run ``target(payload)`` in N processes on this machine, torchrun-style.

One process runs in-process (no spawn). Several processes are started with the ``spawn`` method, each with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and a free ``MASTER_PORT`` in
its environment; ``vitssl.distributed.init_distributed`` joins them (gloo on CPU, NCCL on GPU). Rank
0's return value comes back to the caller. When a rank raises, the others get a short grace period (they
are usually blocked in a collective that will never complete) and are then terminated; the caller gets
the rank's exception re-raised, with the child's traceback attached as its cause.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from vitssl.launch.common import LaunchError, RemoteTraceback, Target, resolve_target

_logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (a spawned child copies the environment when it starts)."""
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _child(target: Target, payload: Any, rank: int, conn: Connection) -> None:
    """Entry point of one spawned rank: run the target, send ("ok", result) or ("error", exc, traceback)."""
    try:
        result = resolve_target(target)(payload)
        conn.send(("ok", result if rank == 0 else None))
    except BaseException as err:  # the parent re-raises it; KeyboardInterrupt / SystemExit included
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(err)
            pickle.loads(payload)  # some exceptions pickle but cannot be rebuilt
        except Exception:
            payload = None
        conn.send(("error", payload, tb))
        raise SystemExit(1) from None
    finally:
        conn.close()
        _destroy_process_group()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _rank_error(rank: int, message: tuple | None, exitcode: int | None) -> BaseException:
    """The exception to raise in the caller for a failed rank."""
    if message is not None and message[0] == "error":
        _, payload, tb = message
        if payload is not None:
            err = pickle.loads(payload)
            err.__cause__ = RemoteTraceback(f"[rank {rank}] {tb}")
            return err
        return LaunchError(f"rank {rank} raised an exception that cannot be sent back:\n{tb}")
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        return LaunchError(f"rank {rank} was killed by signal {name} (out of memory? check the system log)")
    return LaunchError(f"rank {rank} exited with code {exitcode} without a result; see its output above")


def run_local(target: Target, payload: Any, nprocs: int = 1, grace_s: float = 10.0) -> Any:
    """Run ``target(payload)`` in ``nprocs`` processes on this machine and return rank 0's result.

    Args:
        target: ``"module:function"`` or a module-level callable taking the payload.
        payload: the job's picklable payload (sent to each spawned process).
        nprocs: number of processes (ranks); 1 calls the target in this process.
        grace_s: seconds the other ranks get to exit after one failed, before they are terminated.

    Returns:
        What ``target`` returned on rank 0.

    Raises:
        Exception: the first failing rank's exception (its traceback in ``__cause__``), or
            :class:`~vitssl.launch.common.LaunchError` when a rank died without one.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs={nprocs} must be at least 1")
    if nprocs == 1:
        return resolve_target(target)(payload)

    resolve_target(target)  # fail here, not in N children, on a bad target
    ctx = mp.get_context("spawn")  # fork would copy torch's threads and locks into the children
    base_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nprocs)}
    base_env["LOCAL_WORLD_SIZE"] = str(nprocs)
    if "OMP_NUM_THREADS" not in os.environ:
        # like torchrun: N processes × all cores each would oversubscribe the CPU
        base_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nprocs))
    procs, conns = [], []
    for rank in range(nprocs):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(target, payload, rank, send), name=f"vitssl-rank{rank}")
        try:
            with _environ({**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}):
                proc.start()
        except (pickle.PicklingError, AttributeError, TypeError) as err:  # spawn pickles the target
            _terminate(procs)
            raise LaunchError(
                f"cannot send launch target {target!r} to the spawned processes ({err}); pass a "
                "'module:function' string or a function defined at module level"
            ) from err
        send.close()  # the child holds the only write end: EOF tells us it is gone
        procs.append(proc)
        conns.append(recv)
    _logger.info("started %d local processes (MASTER_PORT=%s)", nprocs, base_env["MASTER_PORT"])
    try:
        messages, first_failed = _collect(procs, conns, grace_s)
    except BaseException:  # KeyboardInterrupt included: do not leave orphans behind
        _terminate(procs)
        raise
    if first_failed is not None:
        # The first rank to fail holds the cause; the others usually fail in a collective because of it.
        raise _rank_error(first_failed, messages[first_failed], procs[first_failed].exitcode)
    return messages[0][1]


def _collect(procs: list, conns: list[Connection], grace_s: float) -> tuple[list[tuple | None], int | None]:
    """Wait for every rank's message and exit; after the first failure, terminate the rest after grace_s.

    Returns:
        The message of each rank (None if it sent none) and the first rank seen failing (None if none did).
    """
    messages: list[tuple | None] = [None] * len(procs)
    open_conns = {conn: rank for rank, conn in enumerate(conns)}
    first_failed: int | None = None
    deadline: float | None = None
    while open_conns or any(p.is_alive() for p in procs):
        ready = wait(list(open_conns) + [p.sentinel for p in procs if p.is_alive()], timeout=1.0)
        for obj in ready:
            if obj in open_conns:
                rank = open_conns[obj]
                with contextlib.suppress(EOFError):  # EOF: the child died before sending anything
                    messages[rank] = obj.recv()
                obj.close()
                del open_conns[obj]
        if first_failed is None:
            for rank, proc in enumerate(procs):
                sent_error = messages[rank] is not None and messages[rank][0] == "error"
                if sent_error or proc.exitcode not in (None, 0):
                    first_failed = rank
                    deadline = time.monotonic() + grace_s
                    break
        if deadline is not None and time.monotonic() > deadline:
            _terminate(procs)
            for conn in open_conns:
                conn.close()
            break
    for proc in procs:
        proc.join()
    for rank, proc in enumerate(procs):  # a rank that exited non-zero after sending "ok" still failed
        if first_failed is None and proc.exitcode != 0:
            first_failed = rank
    return messages, first_failed


def _terminate(procs: list, timeout_s: float = 10.0) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    end = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
