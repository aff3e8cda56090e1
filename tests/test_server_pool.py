"""Which server each attempt goes to (generate/servers.py): balancing, rests, probation."""

import asyncio

import pytest

from reasondistill.generate import servers
from reasondistill.generate.servers import FAILURES_TO_REST, REST_SECONDS, ServerPool


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(servers.time, "monotonic", clock)
    return clock


def acquire(pool: ServerPool):
    return asyncio.run(pool.acquire())


def test_attempts_go_to_the_server_with_the_fewest_in_flight(clock):
    pool = ServerPool(["http://a/v1", "http://b/v1", "http://c/v1"])
    taken = [acquire(pool) for _ in range(6)]
    assert [s.url for s in taken] == ["http://a/v1", "http://b/v1", "http://c/v1"] * 2
    pool.release(taken[1], failed=False)
    pool.release(taken[4], failed=False)  # b has none in flight now
    assert acquire(pool).url == "http://b/v1"


def test_a_failing_server_rests_then_takes_one_probe_at_a_time_until_one_succeeds(clock):
    pool = ServerPool(["http://dead/v1", "http://alive/v1"])
    dead, alive = pool.servers
    rested = []
    while not dead.rests:  # one attempt at a time, each on the server used least
        server = acquire(pool)
        rested.append(pool.release(server, failed=server is dead))
    assert rested.count(True) == 1 and len(rested) == 2 * FAILURES_TO_REST - 1
    assert all(acquire(pool) is alive for _ in range(5))  # resting: every attempt goes elsewhere
    clock.now += REST_SECONDS
    assert acquire(pool) is dead  # back: one probe
    assert all(acquire(pool) is alive for _ in range(5))  # not a second one while it is out
    assert pool.release(dead, failed=True)  # the probe failed: rested again at once, twice as long
    clock.now += REST_SECONDS
    assert acquire(pool) is alive
    clock.now += REST_SECONDS
    probe = acquire(pool)
    assert probe is dead
    assert not pool.release(probe, failed=False)  # the probe succeeded: on duty again
    assert not dead.probation and [acquire(pool) is dead for _ in range(2)] == [True, True]  # alive is busier


def test_a_lone_server_is_never_rested(clock):
    pool = ServerPool(["http://only/v1"])
    for _ in range(2 * FAILURES_TO_REST):
        assert not pool.release(acquire(pool), failed=True)
    assert acquire(pool).url == "http://only/v1"
