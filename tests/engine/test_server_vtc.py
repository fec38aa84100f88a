"""FairQueue: the VTC admission order of the engine server."""

from llmudf.engine.vtc import FairQueue


def drain(q: FairQueue) -> list[str]:
    order = []
    while (popped := q.pop()) is not None:
        order.append(popped[1])
    return order


def test_flooding_client_does_not_starve_a_small_one():
    q = FairQueue()
    for i in range(20):
        q.push("flood", f"a{i}", cost=10)
    q.push("few", "b0", cost=10)
    q.push("few", "b1", cost=10)
    order = drain(q)
    # equal service per admission: the small client's requests alternate with the flood's
    assert order[:4] == ["a0", "b0", "a1", "b1"]
    assert order[4:] == [f"a{i}" for i in range(2, 20)]


def test_fifo_baseline_serves_in_arrival_order():
    q = FairQueue(fair=False)
    for i in range(5):
        q.push("flood", f"a{i}", cost=10)
    q.push("few", "b0", cost=10)
    assert drain(q) == ["a0", "a1", "a2", "a3", "a4", "b0"]


def test_counter_charges_real_tokens_at_finish():
    q = FairQueue(prompt_weight=1.0, output_weight=2.0)
    q.push("c", "r", cost=5)
    assert q.pop() == ("c", "r")
    assert q.counter("c") == 5
    q.finish("c", estimated_cost=5, num_prompt_tokens=8, num_generated=3)
    assert q.counter("c") == 8 + 2 * 3


def test_returning_client_is_lifted_to_the_active_minimum():
    q = FairQueue()
    q.push("busy", "x0", cost=100)
    q.pop()
    q.push("busy", "x1", cost=100)  # busy: counter 100, one running, one waiting
    q.push("idle", "y0", cost=1)  # was never served: lifted from 0 to 100, no banked credit
    assert q.counter("idle") == 100
    assert drain(q) == ["x1", "y0"]  # tie at 100 goes to the older request


def test_heavier_requests_cost_more_service():
    q = FairQueue()
    for i in range(4):
        q.push("long", f"L{i}", cost=40)
        q.push("short", f"S{i}", cost=10)
    order = drain(q)
    # four short requests cost what one long one does: they go first
    assert order.index("S3") < order.index("L1")


def test_remove_drops_waiting_items():
    q = FairQueue()
    for i in range(4):
        q.push("c", i, cost=1)
    assert q.remove("c", lambda item: item % 2 == 0) == [0, 2]
    assert len(q) == 2
    assert drain(q) == [1, 3]
