"""Staging buffers: one model's accepted, not yet stepped events, as tokens and gaps in one ring
(no JAX).

Ingest (the API layer) reserves a contiguous region per packet and validates and tokenises the
packet's columns straight into it; a step reads the regions in place (the native step takes
ragged rows of the flat buffers) or gathers them once into its padded shape (XLA); the scheduler
releases a region when the step that read the packet's last chunk has finished. Nothing is copied
per packet in between.

Regions are handed out in ring order and released in any order; the free space is the part of
the ring between the newest region and the oldest one still held, so one slow region holds up
reuse of the space behind it until it is released. A packet that does not fit waits
(:meth:`StagingBuffer.reserve_wait`): that is backpressure, like ``max_inflight``, and it cannot
deadlock, because every held region belongs to work the scheduler finishes without new input.
The buffers are written and released on the event loop only; the step thread reads regions it
was given, which nobody writes until they are released.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np


class Region:
    """``[start, start + size)`` of a staging buffer, held until released."""

    __slots__ = ("start", "size", "held")

    def __init__(self, start: int, size: int):
        self.start, self.size, self.held = start, size, True


class StagingBuffer:
    """tokens, gaps int32 [capacity] and the ring of held regions (see module docstring)."""

    def __init__(self, capacity: int):
        if capacity < 2:
            raise ValueError("a staging buffer holds at least 2 events")
        self.capacity = capacity
        self.tokens = np.zeros(capacity, np.int32)
        self.gaps = np.zeros(capacity, np.int32)
        self._regions: deque[Region] = deque()  # held or not yet passed by the head, ring order
        self._head = 0  # start of the oldest region (== tail when there is none)
        self._tail = 0  # end of the newest region
        self._queue: list[object] = []  # packets waiting for room, in arrival order
        self._changed = asyncio.Event()

    @property
    def held(self) -> int:
        """Events in held regions (and released ones the head has not passed yet)."""
        if not self._regions:
            return 0
        if self._tail > self._head:
            return self._tail - self._head
        return self.capacity - self._head + self._tail

    def reserve(self, size: int) -> Region | None:
        """A region of ``size`` (1 .. capacity - 1) events at the ring's tail, or None when the
        free space has no contiguous run that long or other packets wait for room."""
        if not 0 < size < self.capacity:
            raise ValueError(f"a region of {size} events does not fit a ring of {self.capacity}")
        return None if self._queue else self._take(size)

    async def reserve_wait(self, size: int) -> Region:
        """:meth:`reserve`, waiting in line (first come, first served) until the region fits."""
        region = self.reserve(size)
        if region is not None:
            return region
        me = object()
        self._queue.append(me)
        try:
            while True:
                if self._queue[0] is me:
                    region = self._take(size)
                    if region is not None:
                        return region
                self._changed.clear()
                await self._changed.wait()
        finally:
            self._queue.remove(me)
            self._changed.set()  # the next in line may fit now

    def _take(self, size: int) -> Region | None:
        if not self._regions:
            self._head = self._tail = 0
        # Occupied: [head, tail) when tail > head, else [head, capacity) + [0, tail). The tail
        # never catches up with the head from behind (strict <), so head == tail means empty.
        if self._tail >= self._head:
            if self.capacity - self._tail >= size:
                start = self._tail
            elif size < self._head:
                start = 0  # wrap; the end of the ring past the old tail is skipped
            else:
                return None
        elif self._head - self._tail > size:
            start = self._tail
        else:
            return None
        region = Region(start, size)
        self._regions.append(region)
        self._tail = start + size
        return region

    def shrink(self, region: Region, size: int) -> None:
        """Hand back the end of the newest region past its first ``size`` (1 .. its size)
        events: room reserved for a packet before its filters said how many it keeps."""
        if not (self._regions and self._regions[-1] is region and region.held and 0 < size <= region.size):
            raise ValueError("only the newest held region shrinks, to 1 .. its size events")
        region.size = size
        self._tail = region.start + size

    def release(self, region: Region | None) -> None:
        """Give a region back (once); the head moves past every released region at the front."""
        if region is None or not region.held:
            return
        region.held = False
        regions = self._regions
        while regions and not regions[0].held:
            regions.popleft()
        self._head = regions[0].start if regions else self._tail
        if self._queue:
            self._changed.set()
