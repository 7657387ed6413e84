"""Counting work in flight, so a shutdown can wait for it to finish."""

from __future__ import annotations

import asyncio


class InFlight:
    """`with in_flight:` around each piece of work; `await in_flight.wait(timeout)`
    returns True once none is left, False if some still run at the deadline."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
