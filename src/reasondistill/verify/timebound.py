"""Call a function in helper processes, with a time limit that can really stop it.

math-verify's own timeouts use `signal.alarm`, which works only on a process's main thread, and
SymPy can spin for minutes on answers such as `2^{2^{2^{100}}}`. A thread cannot be stopped from
outside, so the work runs in helper processes instead: a call that overruns kills its helper, and a
later call starts a fresh one while the other helpers keep working.

Each object keeps a pool of helpers, at most `workers` (default: the cores this process may use),
started only when a call finds none idle, so N threads grade N answers at once and a three-answer
job starts one helper, not one per core. A copy in another process (pickled or forked) starts its
own helpers there; a forked copy never touches its parent's pipes.

Helpers die with their parent: on Linux through the parent-death signal (SIGKILL), and everywhere
through a thread that watches the parent's pid and through end of input. A helper whose caller has
gone away exits quietly, without a traceback. The parent-death signal follows the *thread* that
started a process, so helpers are started from one thread that lives as long as the process, never
from a caller's thread (a ThreadPoolExecutor's workers end, and their helpers would end with them).

The helper is a fresh interpreter (`python -m reasondistill.verify.timebound`) rather than a
multiprocessing child, so it never re-imports the caller's `__main__` (multiprocessing's spawn would
re-run a user's unguarded script). Arguments and results travel as JSON lines. POSIX only (select).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

STARTUP_TIMEOUT_S = 120.0  # importing SymPy in a fresh process can take seconds on a busy machine
PARENT_POLL_S = 0.5  # how often a helper checks that its parent is alive, where no death signal exists
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class TimeBoundCall:
    def __init__(
        self,
        fn: Callable[..., Any],
        timeout_s: float,
        prepare: Callable[[], None] | None = None,
        workers: int | None = None,
    ):
        """`fn` and `prepare` must be module-level functions (the helpers import them by name); `fn`
        takes and returns JSON values. `prepare()` runs once in each new helper, before its first
        call and outside the calls' time limit (slow imports). `workers` caps the helpers running at
        once; None means one per core this process may use (a pickled copy counts again where it is
        unpickled)."""
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.fn, self.timeout_s, self.prepare, self.requested_workers = fn, timeout_s, prepare, workers
        self.workers = workers or available_cores()
        self._helpers = _Helpers(self.workers)

    def __call__(self, *args) -> Any:
        """`fn(*args)` as computed by a helper; TimeoutError if it took longer than `timeout_s`.

        An exception raised by `fn` is raised here as a ValueError with its type and message; a
        helper that dies during the call (killed from outside, out of memory) is a RuntimeError.
        """
        helpers = self._helpers_here()
        helper = helpers.take(self._start_helper)
        try:
            ok, value = self._ask(helper, args)
        except BaseException:  # overrun, crash or interrupt: the helper's state is unknown
            helpers.discard(helper)
            raise
        helpers.give_back(helper)
        if not ok:
            raise ValueError(value)
        return value

    def close(self) -> None:
        """Stop the idle helpers now rather than when this process exits; later calls start new ones."""
        self._helpers.close()

    def _helpers_here(self) -> _Helpers:
        if self._helpers.pid != os.getpid():  # forked: the parent's helpers and pipes stay the parent's
            with _fork_lock:
                if self._helpers.pid != os.getpid():
                    self._helpers = _Helpers(self.workers)
        return self._helpers

    def _start_helper(self) -> subprocess.Popen:
        targets = [_name(self.fn)] + ([_name(self.prepare)] if self.prepare else [])
        helper = _start_from_lasting_thread([sys.executable, "-m", __name__, str(os.getpid()), *targets])
        if not _readable(helper, STARTUP_TIMEOUT_S):
            _kill(helper)
            raise TimeoutError(f"the helper process for {self.fn.__name__} did not start")
        if helper.stdout.readline().strip() != "ready":  # it closed its output: it is exiting
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(STARTUP_TIMEOUT_S)
            _kill(helper)
            raise RuntimeError(
                f"the helper process for {self.fn.__name__} exited while starting (status "
                f"{helper.returncode}); its error is printed above"
            )
        return helper

    def _ask(self, helper: subprocess.Popen, args: tuple) -> tuple[bool, Any]:
        try:
            helper.stdin.write(json.dumps(args) + "\n")
            helper.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None
        if not _readable(helper, self.timeout_s):
            raise TimeoutError(f"{self.fn.__name__} took longer than {self.timeout_s}s")
        line = helper.stdout.readline()
        if not line:
            raise self._died()
        return json.loads(line)

    def _died(self) -> RuntimeError:
        return RuntimeError(f"the helper process for {self.fn.__name__} died during a call")

    def __getstate__(self) -> dict:
        return {
            "fn": self.fn,
            "timeout_s": self.timeout_s,
            "prepare": self.prepare,
            "workers": self.requested_workers,  # None: sized where the copy runs
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit this module's globals may be gone already.
        try:  # noqa: SIM105
            self._helpers.close()
        except Exception:  # half-built, or at interpreter exit: the helpers exit at end of input anyway
            pass


class _Helpers:
    """The helper processes of one TimeBoundCall in one process: at most `size`, started on demand.

    Counted are helpers idle, busy and starting; a helper is started outside the lock, so threads do
    not wait for each other's (slow) imports.
    """

    def __init__(self, size: int):
        self.pid, self.size = os.getpid(), size
        self._changed = threading.Condition()
        self._idle: list[subprocess.Popen] = []
        self._count = 0

    def take(self, start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        """An idle helper (the most recently used), else a new one if there is room, else wait."""
        with self._changed:
            while True:
                while self._idle:
                    helper = self._idle.pop()
                    if helper.poll() is None:
                        return helper
                    _kill(helper)  # died while idle (killed from outside): close its pipes
                    self._count -= 1
                if self._count < self.size:
                    self._count += 1
                    break
                self._changed.wait()
        try:
            return start()
        except BaseException:
            self._forget_one()
            raise

    def give_back(self, helper: subprocess.Popen) -> None:
        with self._changed:
            self._idle.append(helper)
            self._changed.notify()

    def discard(self, helper: subprocess.Popen) -> None:
        _kill(helper)
        self._forget_one()

    def close(self) -> None:
        if self.pid != os.getpid():  # a forked copy's helpers belong to the parent
            return
        with self._changed:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._changed.notify_all()
        for helper in idle:
            _kill(helper)

    def _forget_one(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify()


def _kill(helper: subprocess.Popen) -> None:
    helper.kill()
    helper.wait()
    for pipe in (helper.stdin, helper.stdout):
        with contextlib.suppress(OSError):  # a request left unsent in the buffer cannot be flushed
            pipe.close()


def _readable(helper: subprocess.Popen, timeout_s: float) -> bool:
    ready, _, _ = select.select([helper.stdout], [], [], timeout_s)
    return bool(ready)


# Helpers are started by one daemon thread per process, so their parent-death signal fires when the
# process ends and not when the caller's thread does. Reset in a forked child, which has no such thread.
_fork_lock = threading.Lock()
_start_requests: queue.SimpleQueue | None = None


def _start_from_lasting_thread(argv: list[str]) -> subprocess.Popen:
    global _start_requests
    with _fork_lock:
        if _start_requests is None:
            _start_requests = queue.SimpleQueue()
            threading.Thread(
                target=_start_forever, args=(_start_requests,), name="timebound-starter", daemon=True
            ).start()
        requests = _start_requests
    started: Future = Future()
    requests.put((argv, started))
    return started.result()


def _start_forever(requests: queue.SimpleQueue) -> None:
    while True:
        argv, started = requests.get()
        try:
            helper = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            started.set_result(helper)
        except BaseException as err:  # the caller raises it
            started.set_exception(err)


def _forget_parent_state() -> None:
    global _fork_lock, _start_requests
    _fork_lock, _start_requests = threading.Lock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_state)


def _name(fn: Callable) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(name: str) -> Callable:
    module, _, qualname = name.partition(":")
    return getattr(importlib.import_module(module), qualname)


# --- the helper's side ---


def _die_with_parent(parent_pid: int) -> None:
    """Exit when `parent_pid` does: the parent-death signal on Linux, a watching thread everywhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the signal was armed: nobody would send it
        os._exit(0)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(0)  # adopted by another process: the caller is gone


def _reply(fn: Callable, line: str) -> str:
    try:
        return json.dumps([True, fn(*json.loads(line))])
    except Exception as err:  # reported to the caller, which decides what it means
        return json.dumps([False, f"{type(err).__name__}: {err}"])


def _serve(parent_pid: str, fn_name: str, prepare_name: str | None = None) -> None:
    _die_with_parent(int(parent_pid))
    # Ctrl-C reaches every process of the terminal's group; the caller decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Replies go to the original stdout; anything the work prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.disable(logging.WARNING)  # library warnings would interleave with the caller's progress bars
    fn = _resolve(fn_name)
    if prepare_name:
        _resolve(prepare_name)()
    try:
        replies.write("ready\n")
        replies.flush()
        for line in sys.stdin:  # ends when the caller closes its end, or exits
            replies.write(_reply(fn, line) + "\n")
            replies.flush()
    except BrokenPipeError:  # the caller stopped listening (it timed out or exited): nothing left to do
        os._exit(0)


if __name__ == "__main__":
    _serve(*sys.argv[1:])
