"""torch.distributed helpers for tensor-parallel decoding: the process group optimize shards over, and a
launcher that runs a function on P local processes (gloo on CPU, NCCL on GPUs) and never hangs.

``run_parallel(fn, world_size)`` spawns the ranks, initialises the process group in each, runs
``fn(rank, world_size, *args)`` and returns the ranks' results in rank order. It watches exit codes: when a
rank fails (an exception, a crash, a kill), the others are killed at once (they may be blocked in a
collective waiting for it) and ``RuntimeError("rank 1 failed during start-up: ...")`` (or "... failed
while running ...") names the first rank that failed; when ``timeout`` passes, every rank still running is
killed and the error lists them.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .errors import GqlaError


@dataclass(frozen=True)
class TensorParallel:
    """The process group optimize shards one model over, and this process's place in it."""

    size: int
    rank: int
    group: Any
    backend: str


def tensor_parallel_group(tp: int | None) -> TensorParallel | None:
    """None for ``tp`` in (None, 1); else the default process group, which must hold exactly ``tp`` ranks."""
    if tp in (None, 1):
        return None
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp must be a positive integer or None, got {tp!r}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise GqlaError(
            f"tp={tp} shards the attention over a torch.distributed process group of {tp} ranks, and none is "
            "initialised in this process: start the ranks with `torchrun --nproc-per-node "
            f"{tp} script.py` and call gqla_compile.distributed.init_from_env() (or "
            "torch.distributed.init_process_group) before optimize, or use gqla_compile.distributed.run_parallel"
        )
    world = dist.get_world_size()
    if world != tp:
        raise ValueError(f"tp={tp}, but the default process group has {world} ranks; they must be equal")
    return TensorParallel(tp, dist.get_rank(), dist.group.WORLD, dist.get_backend())


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None, timeout: float = 120.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); on GPUs also select this rank's device. Returns (rank, world size)."""
    import torch.distributed as dist

    backend = backend or default_backend()
    if backend == "nccl":  # one device per rank, chosen before NCCL binds to one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))) % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: Sequence, setup: Callable | None,
           results, group_timeout: float, threads: int) -> None:
    phase = "start-up"
    try:
        import torch.distributed as dist

        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        if setup is not None:
            setup(rank, world_size)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=group_timeout))
        phase = "run"
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", value))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        results.put((rank, phase, f"{detail}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def run_parallel(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str | None = None,
    setup: Callable[[int, int], None] | None = None,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes inside one process group.

    ``fn``, ``setup`` and ``args`` must be picklable (module-level functions). ``setup(rank, world_size)``
    runs in each rank before the process group is created (seeds, environment); a failure there, or in the
    group's initialisation, is reported as "failed during start-up". Returns each rank's return value, in
    rank order. Raises ``RuntimeError`` naming the first rank that failed, or the ranks still running when
    ``timeout`` (seconds, the whole run) passed; the other ranks are killed either way.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    backend = backend or default_backend()
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_child, args=(rank, world_size, port, backend, fn, args, setup, results, timeout, threads),
                        daemon=True, name=f"gqla-rank-{rank}")
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    failure: str | None = None
    try:
        while len(outcomes) < world_size:
            try:
                rank, status, value = results.get(timeout=0.2)
                outcomes[rank] = (status, value)
                if status != "ok":
                    failure = _failure_message(rank, status, value)
                    break
                continue
            except queue_module.Empty:
                pass
            dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and r not in outcomes]
            if dead:
                failure = _drain_failure(results, outcomes) or _failure_message(
                    dead[0], "start-up", f"exited with code {processes[dead[0]].exitcode} and no report")
                break
            if time.monotonic() > deadline:
                running = [r for r in range(world_size) if r not in outcomes]
                failure = f"timed out after {timeout:.0f} s; ranks {running} were still running and were killed"
                break
    finally:
        _stop(processes, kill=failure is not None)
    if failure is not None:
        raise RuntimeError(failure)
    return [outcomes[r][1] for r in range(world_size)]


def _drain_failure(results, outcomes) -> str | None:
    """A rank that died may have reported why just before: prefer its report to a bare exit code."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=0.1)
        except queue_module.Empty:
            continue
        outcomes[rank] = (status, value)
        if status != "ok":
            return _failure_message(rank, status, value)
    return None


def _failure_message(rank: int, phase: str, detail: str) -> str:
    when = "during start-up" if phase == "start-up" else "while running"
    return f"rank {rank} failed {when}: {detail}"


def _stop(processes, *, kill: bool) -> None:
    """Join finished ranks; kill the rest (they may be blocked in a collective waiting for a dead rank)."""
    for process in processes:
        if kill and process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=10 if not kill else 5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
