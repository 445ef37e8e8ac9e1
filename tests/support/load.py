"""A bounded HTTPS load generator through a proxy (aiohttp, keep-alive, N workers)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp


@dataclass
class LoadResult:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    samples: dict[str, int] = field(default_factory=dict)  # named checkpoints, e.g. RSS

    @property
    def failures(self) -> int:
        return sum(self.errors.values()) + sum(n for s, n in self.statuses.items() if s != 200)


async def run_load(url: str, *, proxy: str | None, ca_file: str, total: int,
                   concurrency: int, max_seconds: float, headers: dict[str, str],
                   checkpoint: Callable[[str], None] | None = None,
                   new_connection_each_time: bool = False) -> LoadResult:
    """Send `total` GETs with `concurrency` workers, stopping early after `max_seconds`."""
    context = ssl.create_default_context(cafile=ca_file)
    result = LoadResult()
    issued = 0
    halfway = total // 2
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker() -> None:
        nonlocal issued
        connector = aiohttp.TCPConnector(ssl=context, limit=1,
                                         force_close=new_connection_each_time)
        async with aiohttp.ClientSession(connector=connector) as session:
            while issued < total and time.perf_counter() < deadline:
                issued += 1
                if issued == halfway and checkpoint:
                    checkpoint("middle")
                sent = time.perf_counter()
                try:
                    async with session.get(url, proxy=proxy, headers=headers,
                                           timeout=aiohttp.ClientTimeout(total=30)) as response:
                        await response.read()
                        result.statuses[response.status] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    result.errors[type(exc).__name__] += 1
                result.latencies.append(time.perf_counter() - sent)
                result.requests += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result
