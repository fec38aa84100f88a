"""The Arrow Flight servicer: `DoExchange` and the actions in front of an EngineService.

Handlers run on Flight's threads and only `submit` / `cancel` calls and read their results;
the service's loop thread stays the single owner of the engine. Wire format: engine/wire.py.
"""

from __future__ import annotations

import json
import os
import queue

import pyarrow.flight as flight

from llmudf.engine import wire
from llmudf.engine.service import EngineService, ServiceUnavailable

MAX_ROWS_PER_ANSWER_BATCH = 256


class FlightEngineServer(flight.FlightServerBase):
    """Streams each exchange's requests into the service and its answers back as they finish."""

    def __init__(self, service: EngineService, location: str, model_id: str):
        super().__init__(location)
        self.service = service
        self.model_id = model_id

    def do_exchange(self, context, descriptor, reader, writer):
        client_id, params = wire.decode_command(descriptor.command)
        ids, prompts = wire.read_requests(reader)
        try:
            call = self.service.submit(client_id, prompts, params)
        except ServiceUnavailable as exc:
            raise flight.FlightUnavailableError(str(exc)) from exc
        writer.begin(wire.ANSWER_SCHEMA)
        num_left = len(prompts)
        try:
            while num_left:
                results = [call.next_answer()]
                while len(results) < MAX_ROWS_PER_ANSWER_BATCH:
                    try:
                        results.append(call.results.get_nowait())
                    except queue.Empty:
                        break
                num_left -= len(results)
                writer.write_batch(wire.encode_answers(results, ids))
        except BaseException:
            self.service.cancel(call)  # the client went away: free its engine slots
            raise

    def do_action(self, context, action):
        if action.type == "health":
            body = {"alive": self.service.is_alive, "error": self.service.load_error}
        elif action.type == "ready":
            body = {"ready": self.service.is_ready, "model": self.model_id}
        elif action.type == "stats":
            body = {
                "num_waiting": self.service.num_waiting,
                "num_running": self.service.num_running,
                "num_served": self.service.num_served,
                "pid": os.getpid(),
                "engine": self.service.engine_stats(),
            }
        else:
            raise flight.FlightServerError(
                f"unknown action {action.type!r}; known: {', '.join(wire.ACTIONS)}"
            )
        yield flight.Result(json.dumps(body).encode())

    def list_actions(self, context):
        return list(wire.ACTIONS.items())
