"""Call a function in a helper process, with a time limit that can really stop it.

math-verify's own timeouts use `signal.alarm`, which works only on a process's main thread, and
SymPy can spin for minutes on answers such as `2^{2^{2^{100}}}`. A thread cannot be stopped from
outside, so the work runs in a helper process instead: a call that overruns kills the helper, and
the next call starts a fresh one. One helper per object and process, shared by its threads behind a
lock; a copy in another process (pickled or forked) starts its own helper there.

The helper is a fresh interpreter (`python -m reasondistill.verify.timebound`) rather than a
multiprocessing child, so it never re-imports the caller's `__main__` (multiprocessing's spawn would
re-run a user's unguarded script). Arguments and results travel as JSON lines. POSIX only (select).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

STARTUP_TIMEOUT_S = 120.0  # importing SymPy in a fresh process can take seconds on a busy machine


class TimeBoundCall:
    def __init__(self, fn: Callable[..., Any], timeout_s: float, prepare: Callable[[], None] | None = None):
        """`fn` and `prepare` must be module-level functions (the helper imports them by name); `fn`
        takes and returns JSON values. `prepare()` runs once in each new helper, before its first
        call and outside the calls' time limit (slow imports)."""
        self.fn, self.timeout_s, self.prepare = fn, timeout_s, prepare
        self._lock = threading.Lock()
        self._helper: subprocess.Popen | None = None
        self._owner_pid = os.getpid()

    def __call__(self, *args) -> Any:
        """`fn(*args)` as computed by the helper; TimeoutError if it took longer than `timeout_s`.

        An exception raised by `fn` is raised here as a ValueError with its type and message.
        """
        with self._lock:
            helper = self._running_helper()
            helper.stdin.write(json.dumps(args) + "\n")
            helper.stdin.flush()
            if not _readable(helper, self.timeout_s):
                self._stop_helper()
                raise TimeoutError(f"{self.fn.__name__} took longer than {self.timeout_s}s")
            ok, value = json.loads(helper.stdout.readline())
        if not ok:
            raise ValueError(value)
        return value

    def _running_helper(self) -> subprocess.Popen:
        if self._owner_pid != os.getpid():  # a forked copy must not share its parent's pipes
            self._helper, self._owner_pid = None, os.getpid()
        if self._helper is None or self._helper.poll() is not None:
            targets = [_name(self.fn)] + ([_name(self.prepare)] if self.prepare else [])
            helper = subprocess.Popen(
                [sys.executable, "-m", __name__, *targets],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            if not _readable(helper, STARTUP_TIMEOUT_S) or helper.stdout.readline().strip() != "ready":
                helper.kill()
                raise TimeoutError(f"the helper process for {self.fn.__name__} did not start")
            self._helper = helper
        return self._helper

    def _stop_helper(self) -> None:
        self._helper.kill()
        self._helper.wait()
        self._helper = None

    def __getstate__(self) -> dict:
        return {"fn": self.fn, "timeout_s": self.timeout_s, "prepare": self.prepare}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __del__(self) -> None:
        if getattr(self, "_helper", None) is not None and self._owner_pid == os.getpid():
            self._helper.kill()


def _readable(helper: subprocess.Popen, timeout_s: float) -> bool:
    ready, _, _ = select.select([helper.stdout], [], [], timeout_s)
    return bool(ready)


def _name(fn: Callable) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(name: str) -> Callable:
    module, _, qualname = name.partition(":")
    return getattr(importlib.import_module(module), qualname)


def _serve(fn_name: str, prepare_name: str | None = None) -> None:
    # Replies go to the original stdout; anything the work prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.disable(logging.WARNING)  # library warnings would interleave with the caller's progress bars
    fn = _resolve(fn_name)
    if prepare_name:
        _resolve(prepare_name)()
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        try:
            reply = [True, fn(*json.loads(line))]
        except Exception as err:  # reported to the caller, which decides what it means
            reply = [False, f"{type(err).__name__}: {err}"]
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve(*sys.argv[1:])
