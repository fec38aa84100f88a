"""One engine shared by many clients: a loop thread owns the Engine, clients submit calls.

Flight and HTTP handlers run on their own threads and never touch the Engine. They
`submit` a call (a list of prompts from one client) and read its answers from the call's
queue as requests finish. The loop admits waiting requests into the engine in VTC order
(engine/vtc.py), keeping at most `max_in_engine` there so that the admission order, not the
engine's own queue, decides who is served next. A caller on an event loop passes `notify`
to `submit`: it is called (on the loop thread) after each Result is queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmudf.engine.prompts import is_chat
from llmudf.engine.vtc import FairQueue

CHARS_PER_TOKEN = 4  # admission-time estimate of prompt tokens; corrected when it finishes
SHUTDOWN_ERROR = "engine server shut down before this request finished"
_log = logging.getLogger("llmudf.server")


class ServiceUnavailable(RuntimeError):
    """The engine is still loading, failed to load, or the server is shutting down."""


class ServiceBusy(RuntimeError):
    """A client has too many requests waiting; it may retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class Result:
    """One answer of a call: `output` (an engine Output) or `error` (why it has none, and an
    HTTP-like `status`: 400 bad request, 500 engine failure, 503 server shutting down); in a
    streaming call also one per generated token, with only `token_id` set."""

    index: int
    output: object | None = None
    error: str | None = None
    token_id: int | None = None
    status: int = 200


class Call:
    """The answers of one submitted batch arrive on `results` (one Result per prompt)."""

    def __init__(
        self,
        client_id: str,
        num_prompts: int,
        stream: bool = False,
        notify: Callable[[], None] | None = None,
    ):
        self.client_id = client_id
        self.num_prompts = num_prompts
        self.is_streaming = stream
        self.results: queue.Queue[Result] = queue.Queue()
        self.is_cancelled = False
        self._notify = notify

    def put(self, result: Result) -> None:
        self.results.put(result)
        if self._notify is not None:
            self._notify()

    def next_answer(self, timeout: float | None = None) -> Result:
        """The next finished request's Result, skipping per-token ones."""
        while (result := self.results.get(timeout=timeout)).token_id is not None:
            pass
        return result


@dataclass(slots=True)
class _Ticket:
    call: Call
    index: int
    prompt: object
    params: object
    cost: float
    engine_id: object = None


class EngineService:
    """Owns an Engine on one thread; thread-safe `submit` / `cancel` / `shutdown`.

    >>> service = EngineService(lambda: Engine(EngineConfig(model=path)))  # doctest: +SKIP
    >>> service.start(); service.wait_ready(60)                            # doctest: +SKIP
    >>> chat = [{"role": "user", "content": "Say hi"}]
    >>> call = service.submit("me", [chat], SamplingParams())             # doctest: +SKIP
    >>> call.results.get().output.text                                     # doctest: +SKIP
    'Hi'
    """

    def __init__(
        self,
        engine_factory: Callable[[], object],
        *,
        max_in_engine: int | None = None,
        fair: bool = True,
    ):
        self._engine_factory = engine_factory
        self._max_in_engine = max_in_engine
        self.engine = None
        self.load_error: str | None = None
        self.is_accepting = True
        self.num_served = 0
        self.num_failed = 0
        self.num_prompt_tokens = 0  # of answered requests, Flight and HTTP together
        self.num_cached_tokens = 0
        self.num_generated_tokens = 0
        self.on_step: Callable[[float, int], None] | None = None  # (seconds, num outputs)
        self._last_active = time.monotonic()
        self._fair = FairQueue(fair=fair)
        self._running: dict[object, _Ticket] = {}
        self._to_cancel: list[Call] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmudf-engine-loop", daemon=True)

    # ---- public API ----------------------------------------------------------------------

    def start(self) -> EngineService:
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the engine has loaded (True) or failed / timed out (False)."""
        self._ready.wait(timeout)
        return self.is_ready

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.load_error is None and self.is_accepting

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.load_error is None

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return len(self._fair)

    @property
    def num_running(self) -> int:
        with self._cond:
            return len(self._running)

    def queue_depths(self) -> dict[str, tuple[int, int]]:
        """(waiting, running) requests per client that has any."""
        with self._cond:
            return self._fair.depths()

    @property
    def max_context(self) -> int | None:
        """The engine's context in tokens (prompt + generated); None while it loads."""
        return getattr(self.engine, "max_len", None)

    @property
    def idle_seconds(self) -> float:
        """Seconds since the last request arrived or finished; 0 while there is work."""
        with self._cond:
            if len(self._fair) or self._running:
                return 0.0
            return time.monotonic() - self._last_active

    @property
    def tokenizer(self):
        """The engine's tokenizer (None while it loads); it does not change once loaded."""
        return getattr(self.engine, "tokenizer", None)

    def engine_stats(self) -> dict | None:
        """The engine's counters (None before it is built): every field of its stats (steps,
        tokens, time in steps, and whatever else the engine counts) and the prefix hit rate."""
        stats = getattr(self.engine, "stats", None)
        if stats is None:
            return None
        body = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)
        body["elapsed_s"] = round(body.get("elapsed_s", 0.0), 4)
        if hasattr(stats, "prefix_hit_rate"):
            body["prefix_hit_rate"] = round(stats.prefix_hit_rate, 4)
        return body

    def submit(
        self,
        client_id: str,
        prompts: list,
        params,
        stream: bool = False,
        *,
        max_waiting: int | None = None,
        notify: Callable[[], None] | None = None,
    ) -> Call:
        """Queue `prompts` (each a chat, templated str or token ids: engine/prompts.py) for
        `client_id`; `params` is one SamplingParams for all or a list with one per prompt.
        `stream`: also put a Result with `token_id` on the call's queue for each generated
        token. `max_waiting`: raise ServiceBusy instead if the client would have more than
        this many requests waiting. `notify`: see the module docstring."""
        if self.load_error is not None:
            raise ServiceUnavailable(f"engine failed to load: {self.load_error}")
        if not self.is_accepting:
            raise ServiceUnavailable("engine server is shutting down; retry on a new server")
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        call = Call(client_id, len(prompts), stream, notify)
        with self._cond:
            if max_waiting is not None:
                waiting = self._fair.depths().get(client_id, (0, 0))[0]
                if waiting + len(prompts) > max_waiting:
                    raise ServiceBusy(
                        f"client {client_id!r} has {waiting} requests waiting; at most "
                        f"{max_waiting} may wait",
                        retry_after=1 + waiting // max(1, self._max_in_engine or 1),
                    )
            self._last_active = time.monotonic()
            for i, (prompt, p) in enumerate(zip(prompts, per_prompt, strict=True)):
                cost = self._fair.prompt_weight * _estimate_tokens(prompt)
                self._fair.push(client_id, _Ticket(call, i, prompt, p, cost), cost)
            self._cond.notify()
        return call

    def cancel(self, call: Call) -> None:
        """Drop a call's waiting requests and abort its running ones (client went away)."""
        call.is_cancelled = True
        with self._cond:
            self._to_cancel.append(call)
            self._cond.notify()

    def counter(self, client_id: str) -> float:
        with self._cond:
            return self._fair.counter(client_id)

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting calls, let in-flight work finish for up to `drain_timeout` seconds,
        then answer what is left with an error and stop the loop."""
        self.is_accepting = False
        deadline = time.monotonic() + drain_timeout
        with self._cond:
            while (len(self._fair) or self._running) and self._thread.is_alive():
                if time.monotonic() >= deadline:
                    break
                self._cond.wait(0.05)
        self._stopped.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(timeout=10)
        self._fail_all(SHUTDOWN_ERROR, status=503)

    # ---- the loop thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = self._engine_factory()
            if self._max_in_engine is None:
                config = getattr(self.engine, "config", None)
                self._max_in_engine = getattr(config, "max_num_seqs", 64)
        except Exception as exc:  # surfaced through /health and every submit
            self.load_error = f"{type(exc).__name__}: {exc}"
            self._ready.set()
            return
        self._ready.set()
        while not self._stopped.is_set():
            with self._cond:
                self._apply_cancellations()
                self._admit()
                if not self._running:
                    self._cond.wait(0.05)
                    continue
            start = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a broken step fails its requests, not the server
                _log.exception("engine step failed")
                self._fail_running(f"engine step failed: {type(exc).__name__}: {exc}", 500)
                continue
            if self.on_step is not None:
                self.on_step(time.perf_counter() - start, len(outputs))
            with self._cond:
                for out in outputs:
                    self._deliver(out)
                self._cond.notify_all()

    def _admit(self) -> None:
        while len(self._running) < self._max_in_engine:
            popped = self._fair.pop()
            if popped is None:
                return
            client_id, ticket = popped
            try:
                stream = _token_sink(ticket) if ticket.call.is_streaming else None
                ticket.engine_id = self.engine.add_request(
                    ticket.prompt, ticket.params, stream=stream
                )
            except Exception as exc:  # bad prompt (too long, bad params): answer with why
                self._fair.finish(client_id, ticket.cost, 0, 0)
                self.num_failed += 1
                error = f"{type(exc).__name__}: {exc}"
                ticket.call.put(Result(ticket.index, error=error, status=400))
                continue
            self._running[ticket.engine_id] = ticket

    def _deliver(self, out) -> None:
        ticket = self._running.pop(out.request_id, None)
        if ticket is None:
            return
        self._fair.finish(
            ticket.call.client_id,
            ticket.cost,
            out.num_prompt_tokens - out.num_cached_tokens,
            out.num_generated_tokens,
        )
        self.num_served += 1
        self.num_prompt_tokens += out.num_prompt_tokens
        self.num_cached_tokens += out.num_cached_tokens
        self.num_generated_tokens += out.num_generated_tokens
        self._last_active = time.monotonic()
        ticket.call.put(Result(ticket.index, output=out))

    def _apply_cancellations(self) -> None:
        for call in self._to_cancel:
            for ticket in self._fair.remove(call.client_id, lambda t, c=call: t.call is c):
                self._fair.finish(call.client_id, ticket.cost, 0, 0)
            for engine_id, ticket in list(self._running.items()):
                if ticket.call is call:
                    self.engine.abort(engine_id)
                    del self._running[engine_id]
                    self._fair.finish(call.client_id, ticket.cost, 0, 0)
        self._to_cancel.clear()

    def _fail_running(self, error: str, status: int) -> None:
        with self._cond:
            for engine_id, ticket in list(self._running.items()):
                # the engine may be in a bad state already; the error sent says so
                with contextlib.suppress(Exception):
                    self.engine.abort(engine_id)
                self._fair.finish(ticket.call.client_id, ticket.cost, 0, 0)
                self.num_failed += 1
                ticket.call.put(Result(ticket.index, error=error, status=status))
            self._running.clear()
            self._cond.notify_all()

    def _fail_all(self, error: str, status: int) -> None:
        self._fail_running(error, status)
        with self._cond:
            while (popped := self._fair.pop()) is not None:
                client_id, ticket = popped
                self._fair.finish(client_id, ticket.cost, 0, 0)
                self.num_failed += 1
                ticket.call.put(Result(ticket.index, error=error, status=status))


def _token_sink(ticket: _Ticket):
    return lambda _request_id, token_id: ticket.call.put(Result(ticket.index, token_id=token_id))


def _estimate_tokens(prompt) -> int:
    if is_chat(prompt):
        return sum(len(m.get("content") or "") for m in prompt) // CHARS_PER_TOKEN + 1
    if isinstance(prompt, str):
        return len(prompt) // CHARS_PER_TOKEN + 1
    return len(prompt)  # token ids
