"""A bounded load test of the search endpoint: concurrent queries for a fixed time, replies checked.

    report = run_load_test(url, queries, concurrency=8, duration_s=20.0, max_requests=5000)

`queries` pairs each image file (bytes, box, k) with the ranked names the search must answer (computed
in-process beforehand); a reply that is not 200, or whose names differ, counts as failed or mismatched.
Every request goes to `url`, which must be a loopback address: the test never leaves the machine. It
stops at the deadline or after `max_requests`, whichever comes first, and then sends the malformed
uploads of `MALFORMED`, each of which must be refused with a 4xx and a one-line reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from amldist.errors import require

# (name, body, query string, expected status)
MALFORMED = (
    ("empty body", b"", "", 400),
    ("not an image", b"GIF89a but not really an image" * 4, "", 400),
    ("k is not a number", None, "k=ten", 400),
    ("k out of range", None, "k=0", 400),
    ("box outside the image", None, "bbx=0,0,100000,100000", 400),
    ("box not four numbers", None, "bbx=1,2,3", 400),
)


@dataclass(frozen=True)
class LoadQuery:
    body: bytes                       # the image file
    bbx: tuple[float, float, float, float] | None
    k: int
    expected: tuple[str, ...]         # the names the search answers in-process, best first


@dataclass
class LoadReport:
    concurrency: int
    duration_s: float                 # wall time of the timed phase
    requests: int
    failed: int                       # not 200, or the connection failed
    mismatched: int                   # 200 with other names than expected
    latencies_s: list[float] = field(default_factory=list)
    malformed: list[dict] = field(default_factory=list)   # {name, status, error, ok}

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else float("nan")

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")

    @property
    def passed(self) -> bool:
        return self.failed == 0 and self.mismatched == 0 and all(m["ok"] for m in self.malformed)

    def summary(self) -> dict:
        return {"concurrency": self.concurrency, "duration_s": round(self.duration_s, 3),
                "requests": self.requests, "failed": self.failed, "mismatched": self.mismatched,
                "throughput_per_s": round(self.throughput, 3),
                "p50_ms": round(self.percentile_ms(50), 2), "p90_ms": round(self.percentile_ms(90), 2),
                "p99_ms": round(self.percentile_ms(99), 2), "max_ms": round(self.percentile_ms(100), 2),
                "malformed": self.malformed}


def check_loopback(url: str) -> None:
    """The load test only ever targets this machine."""
    host = urlsplit(url).hostname or ""
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    require(loopback, f"the load test targets loopback addresses only, not {host!r}")


def _params(query: LoadQuery) -> dict[str, str]:
    params = {"k": str(query.k)}
    if query.bbx is not None:
        params["bbx"] = ",".join(f"{v:g}" for v in query.bbx)
    return params


async def _worker(session: aiohttp.ClientSession, url: str, queries: Sequence[LoadQuery], start: int,
                  step: int, deadline: float, budget: list[int], report: LoadReport) -> None:
    position = start
    while time.perf_counter() < deadline and budget[0] > 0:
        budget[0] -= 1
        query = queries[position % len(queries)]
        position += step
        sent = time.perf_counter()
        try:
            async with session.post(f"{url}/search", data=query.body, params=_params(query)) as reply:
                payload = await reply.json() if reply.status == 200 else None
                status = reply.status
        except (TimeoutError, aiohttp.ClientError, ValueError):
            status, payload = None, None
        report.latencies_s.append(time.perf_counter() - sent)
        report.requests += 1
        if status != 200 or payload is None:
            report.failed += 1
        elif tuple(r["name"] for r in payload["results"]) != query.expected:
            report.mismatched += 1


async def _malformed(session: aiohttp.ClientSession, url: str, image: bytes) -> list[dict]:
    checked = []
    for name, body, params, expected in MALFORMED:
        async with session.post(f"{url}/search?{params}", data=image if body is None else body) as reply:
            text = await reply.text()
            try:
                error = (await reply.json()).get("error", "")
            except (aiohttp.ContentTypeError, ValueError):
                error = ""
        one_line = bool(error) and "\n" not in error
        checked.append({"name": name, "status": reply.status, "error": error[:200],
                        "ok": reply.status == expected and one_line,
                        "body": text[:200] if not error else None})
    return checked


async def _run(url: str, queries: Sequence[LoadQuery], concurrency: int, duration_s: float,
               max_requests: int, timeout_s: float) -> LoadReport:
    report = LoadReport(concurrency, 0.0, 0, 0, 0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        budget = [max_requests]
        deadline = started + duration_s
        await asyncio.gather(*[_worker(session, url, queries, i, concurrency, deadline, budget, report)
                               for i in range(concurrency)])
        report.duration_s = time.perf_counter() - started
        report.malformed = await _malformed(session, url, queries[0].body)
    return report


def run_load_test(url: str, queries: Sequence[LoadQuery], *, concurrency: int = 8, duration_s: float = 10.0,
                  max_requests: int = 10_000, timeout_s: float = 120.0) -> LoadReport:
    """Load the endpoint at `url` (loopback only) and check every reply; see the module docstring."""
    check_loopback(url)
    require(len(queries) > 0 and concurrency > 0 and duration_s > 0 and max_requests > 0,
            "a load test needs queries, concurrency > 0, a duration > 0 and max_requests > 0")
    return asyncio.run(_run(url.rstrip("/"), queries, concurrency, duration_s, max_requests, timeout_s))
