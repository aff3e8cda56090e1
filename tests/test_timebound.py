"""The helper-process pool behind MathGrader: calls at once up to `workers`, a time limit that kills only
the overrunning helper, helpers started on demand, and helpers that never outlive their parent.

The work here sleeps instead of computing, so helpers overlap even on a busy two-core machine.
"""

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reasondistill.verify.timebound import TimeBoundCall

TESTS = Path(__file__).resolve().parent


def nap(seconds: float, note: str | None = None) -> int:
    """Sleep in a helper and return its pid; with `note`, first write the pid to that file."""
    if note:
        Path(note).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def fail(message: str) -> None:
    raise KeyError(message)


@pytest.fixture(autouse=True)
def helpers_import_this_module(monkeypatch):
    """Helpers import `nap` by name (`test_timebound:nap`), so they need this folder on their path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie nobody reaped counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel, which cannot tell a zombie apart
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    # A killed process's first thread is a zombie before its other threads are gone; only then can it
    # be reaped (and its pipes closed).
    return stat.rpartition(")")[2].split()[0] in ("Z", "X") and threads == 1


def all_gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def my_children() -> set[int]:
    """The running child processes of this process, from /proc."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[1]) == os.getpid() and fields[0] not in ("Z", "X"):
            children.add(int(stat.parent.name))
    return children


def test_a_call_returns_the_helpers_answer_and_reports_its_errors():
    call = TimeBoundCall(nap, timeout_s=10)
    assert call.workers == len(os.sched_getaffinity(0))
    helper = call(0)
    assert helper != os.getpid() and call(0) == helper  # an idle helper is reused
    failing = TimeBoundCall(fail, timeout_s=10, workers=1)
    with pytest.raises(ValueError, match="KeyError: 'no such row'"):
        failing("no such row")
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        TimeBoundCall(nap, timeout_s=1, workers=0)
    call.close(), failing.close()
    assert all_gone([helper], within_s=5)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts child processes in /proc")
def test_helpers_start_only_when_a_call_finds_none_idle():
    before = my_children()
    call = TimeBoundCall(nap, timeout_s=10, workers=4)
    assert my_children() == before  # nothing started before the first call
    assert {call(0), call(0), call(0)} == my_children() - before  # three calls, one helper
    call.close()


def test_threads_grade_at_once_up_to_the_number_of_workers():
    threads, seconds = 2, 1.0
    call = TimeBoundCall(nap, timeout_s=10, workers=threads)
    with ThreadPoolExecutor(threads) as pool:
        helpers = set(pool.map(call, [0.5] * threads))  # start the helpers outside the measurement
        assert len(helpers) == threads
        started = time.monotonic()
        assert set(pool.map(call, [seconds] * threads)) == helpers
        assert seconds <= time.monotonic() - started < 0.6 * threads * seconds  # one after another: 2 s
    with ThreadPoolExecutor(threads + 1) as pool:  # one thread more than workers waits for a helper
        started = time.monotonic()
        assert set(pool.map(call, [0.5] * (threads + 1))) == helpers
        assert time.monotonic() - started >= 1.0
    call.close()


def test_a_timeout_kills_only_the_overrunning_helper(tmp_path):
    call = TimeBoundCall(nap, timeout_s=1.5, workers=2)
    with ThreadPoolExecutor(2) as pool:
        helpers = set(pool.map(call, [0.3, 0.3]))
        overrun = pool.submit(call, 30, str(tmp_path / "overrun"))
        time.sleep(0.8)
        busy_at_the_kill = pool.submit(call, 1.2)  # runs from 0.8 s to 2.0 s; the overrun dies at 1.5 s
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="nap took longer than 1.5s"):
            overrun.result()
        assert time.monotonic() - started < 2.0
        survivor = busy_at_the_kill.result()
    killed = int((tmp_path / "overrun").read_text())
    assert helpers == {killed, survivor}
    assert gone(killed) and not gone(survivor)
    assert call(0) == survivor  # the survivor serves on; the next call that needs two starts a new one
    call.close()


def test_a_helper_killed_from_outside_is_replaced_and_a_death_mid_call_is_an_error():
    call = TimeBoundCall(nap, timeout_s=10, workers=1)
    first = call(0)
    os.kill(first, signal.SIGKILL)
    assert all_gone([first], within_s=5)
    second = call(0)
    assert second != first
    threading.Timer(0.5, os.kill, (second, signal.SIGKILL)).start()
    with pytest.raises(RuntimeError, match="the helper process for nap died during a call"):
        call(5)
    assert call(0) not in (first, second)
    call.close()


def test_a_helper_outlives_the_thread_that_started_it():
    # Linux sends the parent-death signal when the *thread* that started a process ends.
    call = TimeBoundCall(nap, timeout_s=10, workers=1)
    with ThreadPoolExecutor(1) as pool:
        helper = pool.submit(call, 0).result()
    time.sleep(0.3)  # the pool's thread has ended
    assert not gone(helper) and call(0) == helper
    call.close()


def test_a_forked_copy_starts_its_own_helpers_and_leaves_the_parents_alone():
    call = TimeBoundCall(nap, timeout_s=10, workers=1)
    parent_helper = call(0)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: grade, report the helper's pid, and leave without pytest's cleanup
        try:
            os.write(write_end, str(call(0)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child_helper = int(os.read(read_end, 100))
    os.close(read_end)
    os.waitpid(child, 0)
    assert child_helper != parent_helper
    assert all_gone([child_helper], within_s=5)  # it died with the child
    assert call(0) == parent_helper
    call.close()


def test_a_pickled_copy_keeps_its_settings_and_starts_its_own_helpers():
    call = TimeBoundCall(nap, timeout_s=3, workers=2)
    copy = pickle.loads(pickle.dumps(call))
    assert (copy.fn, copy.timeout_s, copy.prepare, copy.workers) == (nap, 3, None, 2)
    assert copy(0) != call(0)
    sized_where_it_runs = pickle.loads(pickle.dumps(TimeBoundCall(nap, timeout_s=3)))
    assert sized_where_it_runs.requested_workers is None
    call.close(), copy.close()


PARENT = f"""
import sys
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, {str(TESTS)!r})
from test_timebound import nap
from reasondistill.verify.timebound import TimeBoundCall

call = TimeBoundCall(nap, timeout_s=60, workers=2)
with ThreadPoolExecutor(2) as pool:
    print(*pool.map(call, [0.5, 0.5]), flush=True)
    list(pool.map(call, [30, 30]))
"""


def test_helpers_die_with_a_parent_killed_mid_call(tmp_path):
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    helpers = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(set(helpers)) == 2
    time.sleep(0.5)  # both helpers are in their 30-second naps
    parent.kill()
    parent.wait()
    parent.stdout.close()
    assert all_gone(helpers, within_s=3)
    assert "Traceback" not in errors.read_text()


@pytest.mark.parametrize("closed", ["mid-call", "while idle"])
def test_a_helper_whose_caller_stops_listening_exits_quietly(closed):
    helper = subprocess.Popen(
        [sys.executable, "-m", "reasondistill.verify.timebound", str(os.getpid()), "test_timebound:nap"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert helper.stdout.readline() == "ready\n"
    if closed == "mid-call":
        helper.stdin.write("[0.5]\n")
        helper.stdin.flush()
    helper.stdout.close()
    helper.stdin.close()
    assert helper.wait(10) == 0
    assert "Traceback" not in helper.stderr.read()
    helper.stderr.close()


WATCHED_CHILD = """
import sys, threading, time
from reasondistill.verify.timebound import _watch_parent
threading.Thread(target=_watch_parent, args=(int(sys.argv[1]),), daemon=True).start()
time.sleep(30)
"""
STARTER = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())], stdout=subprocess.DEVNULL)
print(child.pid)
"""


def test_without_a_death_signal_a_helper_notices_its_parent_is_gone():
    # The portable fallback alone: a parent that starts a watching child and exits at once.
    started = subprocess.run([sys.executable, "-c", STARTER, WATCHED_CHILD], capture_output=True, timeout=20)
    assert all_gone([int(started.stdout)], within_s=5)


def test_a_helper_whose_parent_died_before_it_armed_the_death_signal_exits():
    code = "import os, time; from reasondistill.verify.timebound import _die_with_parent\n"
    code += "_die_with_parent(os.getppid() + 1); time.sleep(30)"  # as if the parent was someone else
    assert subprocess.run([sys.executable, "-c", code], timeout=20).returncode == 0
