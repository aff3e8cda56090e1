"""The processes of one job: who writes, who waits, and where they meet.

A job started by `accelerate launch` or `torchrun` runs the same command in every process; the
launcher sets RANK and WORLD_SIZE. Training runs in all of them (data parallel, or sharded), but the
run directory has one writer: process 0 writes the manifest, the tokenized data, the checkpoints
and the final model, and runs the steps that are not training (problems, generate, eval …) while
the others wait for it at `barrier()`.

Waiting for a step that is not training (an hour of generation) would time out a collective of the
training group (NCCL's watchdog: 10-30 minutes), so the barrier runs on a separate gloo group with
a long timeout (`REASONDISTILL_WAIT_HOURS`, default 72). When a step fails on process 0, `on_main`
tells the others, which stop with a line naming it; a process that dies is stopped with the rest by
the launcher (torchrun, under accelerate too).

A process without RANK/WORLD_SIZE is a job of one: every function here is then a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from typing import TypeVar

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Process 0 (the only process of a job of one): the one that writes the run directory."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process of the job has reached this point (no-op for a job of one)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier(group=_waiting_group())


def on_main(work: Callable[[], T], what: str) -> T | None:
    """`work()` on process 0 while the others wait for it; None on the others.

    Its outcome reaches every process: if it fails on process 0, it fails on the others too (one
    line naming `what`), rather than leaving them to go on without what it should have made."""
    if world_size() == 1:
        return work()
    failure = None
    try:
        if is_main():
            return work()
    except BaseException as err:
        failure = f"{type(err).__name__}: {err}"
        raise
    finally:
        _share_outcome(failure, what)
    return None


@contextmanager
def alone() -> Iterator[None]:
    """A step that is not training, run by process 0 while the others wait (`Stage.run_in_job`): to
    the code inside, a job of one. A step that trains on the way (select_teacher's proxy students)
    then trains in this process alone, instead of expecting the waiting processes in a data-parallel
    group. accelerate's process state is put back as it was afterwards."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    saved_env = {name: os.environ.pop(name) for name in names if name in os.environ}
    states = (PartialState, AcceleratorState, GradientState)
    saved_states = [dict(state._shared_state) for state in states]
    for state in states:
        state._shared_state.clear()
    os.environ.update(RANK="0", WORLD_SIZE="1")
    try:
        yield
    finally:
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(saved_env)
        for state, saved in zip(states, saved_states, strict=True):
            state._shared_state.clear()
            state._shared_state.update(saved)


def _share_outcome(failure: str | None, what: str) -> None:
    import torch.distributed as dist

    from .errors import UserError

    outcome = [failure]
    dist.broadcast_object_list(outcome, src=0, group=_waiting_group())  # our own strings, not user data
    if outcome[0] is not None and not is_main():
        raise UserError(f"{what} failed on process 0 ({outcome[0]}); this process {rank()} stops too")


def finish() -> None:
    """The last act of a job that ended well: its process groups are destroyed while the
    interpreter is still whole (no-op for a job of one).

    Left to interpreter shutdown, gloo's worker threads can outlive the Python objects they hold,
    and the process aborts (SIGABRT, "terminate called without an active exception") after its
    work is done, failing the launch. Not called on failure: the launcher stops the processes, and
    tearing down a group that another process still uses could hang."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        barrier()  # no process tears down a connection another is still using
        dist.destroy_process_group()  # every group, the waiting one included
    _waiting_group.cache_clear()


def cpu_processes() -> bool:
    """Several processes and no accelerator: accelerate must be told to join them on CPU (gloo),
    or each would train alone."""
    import torch

    return world_size() > 1 and not torch.accelerator.is_available()


@cache
def _waiting_group():
    """A gloo group of every process, for waits that may last as long as a step on process 0.

    The job's default group is created first, as accelerate creates it (nccl on GPUs, gloo on CPUs),
    so that the Trainer later finds and reuses it."""
    import torch.distributed as dist
    from accelerate import PartialState

    # initialises the default process group from the launcher's environment, with the timeout the
    # Trainer would give it (transformers' ddp_timeout default; the Trainer reuses this group)
    PartialState(cpu=cpu_processes(), timeout=timedelta(seconds=1800))
    hours = float(os.environ.get("REASONDISTILL_WAIT_HOURS", "72"))
    return dist.new_group(backend="gloo", timeout=timedelta(hours=hours))
