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


class Alarm(Wakeup):
    """The doorbell of a loop that sleeps until something falls due: it knows when the current
    sleep ends, so a caller rings only when what it brings falls due before that
    (`ring_if_due_before`), and one can see that the loop sleeps (`asleep_s`)."""

    def __init__(self) -> None:
        super().__init__()
        self._until: float | None = None  # loop.time() when the current sleep ends; None while awake

    def ring_if_due_before(self, in_s: float) -> None:
        """Ring unless the loop wakes within `in_s` anyway (awake: ring, so that it looks again
        after its round)."""
        if self._until is None or asyncio.get_running_loop().time() + in_s < self._until:
            self.ring()

    @property
    def asleep_s(self) -> float:
        """Seconds left of the sleep the loop is in; 0 while it is awake or has been rung."""
        if self._until is None or self._event.is_set():
            return 0.0
        return max(0.0, self._until - asyncio.get_running_loop().time())

    async def wait(self, timeout_s: float) -> None:
        self._until = asyncio.get_running_loop().time() + timeout_s
        try:
            await super().wait(timeout_s)
        finally:
            self._until = None
