"""Fair admission between clients: the Virtual Token Counter (VTC) of Sheng et al., OSDI'24.

Every client has a counter of the service it has received (weighted prompt + generated
tokens). The server admits the next request from the backlogged client with the smallest
counter, so a client that floods the server cannot starve one that sends a few requests.
A client that becomes backlogged again is lifted to the smallest backlogged counter, so
idle time does not bank credit it could later spend to starve the others.

>>> q = FairQueue()
>>> q.push("flood", "a1", cost=10); q.push("flood", "a2", cost=10); q.push("few", "b1", cost=10)
>>> [q.pop()[1] for _ in range(3)]
['a1', 'b1', 'a2']
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Client:
    counter: float = 0.0
    waiting: deque = field(default_factory=deque)
    num_running: int = 0


class FairQueue:
    """Per-client FIFO queues; `pop` returns the next (client, item) in VTC order.

    `prompt_weight` / `output_weight` are VTC's w_p and w_q (the paper uses 1 and 2: a
    generated token costs about twice a prompt token). `fair=False` gives plain FIFO across
    clients, the baseline the fairness test compares with.
    """

    def __init__(self, prompt_weight: float = 1.0, output_weight: float = 2.0, fair: bool = True):
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.fair = fair
        self._clients: dict[str, _Client] = {}
        self._num_pushed = 0  # arrival order: ties (and FIFO mode) go to the oldest request

    def __len__(self) -> int:
        return sum(len(c.waiting) for c in self._clients.values())

    def push(self, client_id: str, item, cost: float = 0.0) -> None:
        """Queue `item`; `cost` is the prompt-token estimate charged when it is admitted."""
        client = self._clients.setdefault(client_id, _Client())
        if not self._is_active(client):
            active = [c.counter for c in self._clients.values() if self._is_active(c)]
            if active:
                client.counter = max(client.counter, min(active))
        client.waiting.append((self._num_pushed, item, cost))
        self._num_pushed += 1

    def pop(self) -> tuple[str, object] | None:
        """The next (client_id, item) to admit, charging its prompt cost; None when empty."""
        heads = [
            (c.counter if self.fair else 0.0, c.waiting[0][0], cid)
            for cid, c in self._clients.items()
            if c.waiting
        ]
        if not heads:
            return None
        client_id = min(heads)[2]
        client = self._clients[client_id]
        _, item, cost = client.waiting.popleft()
        client.num_running += 1
        client.counter += cost
        return client_id, item

    def remove(self, client_id: str, predicate) -> list:
        """Drop the waiting items of a client for which `predicate(item)` holds; returns them."""
        client = self._clients.get(client_id)
        if client is None:
            return []
        dropped = [item for _, item, _ in client.waiting if predicate(item)]
        client.waiting = deque(w for w in client.waiting if not predicate(w[1]))
        return dropped

    def finish(
        self, client_id: str, estimated_cost: float, num_prompt_tokens: int, num_generated: int
    ) -> None:
        """A request left the engine: replace its admission estimate with the real service."""
        client = self._clients[client_id]
        client.num_running -= 1
        client.counter += (
            self.prompt_weight * num_prompt_tokens
            - estimated_cost
            + self.output_weight * num_generated
        )

    def depths(self) -> dict[str, tuple[int, int]]:
        """(waiting, running) requests of each client that has any."""
        return {
            cid: (len(c.waiting), c.num_running)
            for cid, c in self._clients.items()
            if c.waiting or c.num_running
        }

    def counter(self, client_id: str) -> float:
        """The service `client_id` has received so far, in weighted tokens."""
        return self._clients[client_id].counter if client_id in self._clients else 0.0

    # ---- private -------------------------------------------------------------------------

    @staticmethod
    def _is_active(client: _Client) -> bool:
        return bool(client.waiting) or client.num_running > 0
