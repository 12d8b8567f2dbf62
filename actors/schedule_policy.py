"""Order of the waiting queue: which request is admitted next.

lpm   longest cached prefix first (keeps shared prefixes hot); falls back to fcfs on long queues, where
      matching every waiting prompt each step would cost more than it saves
fcfs  arrival order
priority  higher `priority` first, then arrival
Retracted requests carry their original arrival time, so they come back before later arrivals.
"""

from __future__ import annotations

from collections.abc import Callable

from radixserve.actors.request_state import Req

LPM_MAX_QUEUE = 128


def order_waiting(policy: str, waiting: list[Req], prefix_len: Callable[[Req], int]) -> list[Req]:
    if policy == "lpm" and len(waiting) <= LPM_MAX_QUEUE:
        for req in waiting:
            req.prefix_hint = prefix_len(req)
        return sorted(waiting, key=lambda r: (-r.prefix_hint, r.arrival_time))
    if policy == "priority":
        return sorted(waiting, key=lambda r: (-r.priority, r.arrival_time))
    return sorted(waiting, key=lambda r: r.arrival_time)
