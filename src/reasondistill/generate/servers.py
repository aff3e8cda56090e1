"""Several OpenAI-compatible servers behind one client: which server each request attempt goes to.

An attempt goes to the server with the fewest requests in flight (ties: the one used least), so a
slow or busy server gets fewer. A server whose attempts fail `FAILURES_TO_REST` times in a row
(connection errors, timeouts, 5xx, malformed answers) is rested (unless it is the only one): left out for a back-off period that
doubles each time it is rested again (`REST_SECONDS` up to `MAX_REST_SECONDS`), then probed back in by
the next attempt it gets; a success ends its failure run. The client retries a failed attempt, and the
retry is placed afresh, so requests in flight on a server that died go to the others. With every
server rested, an attempt waits for the first to come back rather than failing at once.

Each server's requests, tokens, failed attempts and rests are counted (`Usage.servers`, in the
manifest). This module only decides and counts; the client (openai.py) sends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..ui import note

FAILURES_TO_REST = 3
REST_SECONDS = 2.0
MAX_REST_SECONDS = 60.0
PROBE_POLL_SECONDS = 0.05  # how often an attempt looks again while every server is busy probing


@dataclass
class Server:
    url: str
    in_flight: int = 0
    used: int = 0  # attempts sent
    failures_in_a_row: int = 0
    rests: int = 0
    back_in: float = 0.0  # monotonic time it may be used again
    probation: bool = False  # back from a rest: one attempt at a time until one succeeds

    def resting(self, now: float) -> bool:
        return now < self.back_in

    def available(self, now: float) -> bool:
        return not self.resting(now) and not (self.probation and self.in_flight)


class ServerPool:
    def __init__(self, urls: list[str]):
        if not urls:
            raise ValueError("no server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a server URL is given twice: {urls}")
        self.servers = [Server(url.rstrip("/")) for url in urls]

    async def acquire(self, only: Server | None = None) -> Server:
        """The server for the next attempt (waiting while none is available), or `only` (waiting
        while it is not); `release` it after."""
        candidates = self.servers if only is None else [only]
        while True:
            now = time.monotonic()
            ready = [s for s in candidates if s.available(now)]
            if ready:
                server = min(ready, key=lambda s: (s.in_flight, s.used))
                server.in_flight += 1
                server.used += 1
                return server
            resting = [s.back_in - now for s in candidates if s.resting(now)]
            await asyncio.sleep(min(resting) if resting else PROBE_POLL_SECONDS)

    def release(self, server: Server, failed: bool) -> bool:
        """`failed`: the attempt failed in a way that says something about the server (not a 4xx about
        the request itself, nor a 429). True when this puts the server to rest."""
        server.in_flight -= 1
        if not failed:
            server.failures_in_a_row, server.probation = 0, False
            return False
        server.failures_in_a_row += 1
        if len(self.servers) == 1 or server.resting(time.monotonic()):
            return False  # resting the only server would only delay its retries; a rest is running
        if not server.probation and server.failures_in_a_row < FAILURES_TO_REST:
            return False
        rest = min(REST_SECONDS * 2**server.rests, MAX_REST_SECONDS)
        server.rests += 1
        server.back_in = time.monotonic() + rest
        server.failures_in_a_row, server.probation = 0, True
        note(
            f"[yellow]warning:[/] {server.url}: {FAILURES_TO_REST} failed attempts in a row; "
            f"left out for {rest:g} s, the other servers take its requests"
            if server.rests == 1
            else f"[yellow]warning:[/] {server.url}: still failing; left out for {rest:g} s"
        )
        return True
