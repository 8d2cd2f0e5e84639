"""A background loop's doorbell: sleep until rung or until the poll interval passes."""

from __future__ import annotations

import asyncio


class Wakeup:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ring(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> None:
        """Return when rung or after `timeout_s`. Uses asyncio.timeout, not wait_for: on Python
        3.11 wait_for can swallow a cancellation that arrives as the inner wait completes, and a
        loop using it then never stops."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._event.wait()
        except TimeoutError:
            pass
        self._event.clear()
