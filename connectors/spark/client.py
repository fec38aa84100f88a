"""Answering a batch of prompts on the cluster: `SparkClient` (an EngineClient for
`run_call` on the driver) sends the prompts, in their optimized order, as contiguous ranges
to one `mapInArrow` task per executor, and each task asks its node's engine server
(`task_client`: started on first use, shared by the batches a Python worker answers).

A task whose server dies is retried (by the client, then by Spark): greedy answers and the
result cache make the retry give the same answers.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.prompt import ChatPrompt
from llmudf.runtime.client import get_client
from llmudf.runtime.paths import weights_id

__all__ = ["SparkClient", "task_client"]

_ANSWER_SCHEMA = "i long, text string, p int, c int, g int"


class SparkClient:
    """EngineClient that answers a batch on the cluster: prompts keep their (optimized) order,
    are range-partitioned by position, and each task asks its node's engine server."""

    def __init__(self, spark, config: Config, num_partitions: int | None = None):
        self.spark = spark
        self.config = config
        self.num_partitions = num_partitions or _num_executors(spark)

    @property
    def model_id(self) -> str:
        return weights_id(self.config.model)

    def generate(self, prompts: list, params, progress=None, on_output=None) -> list:
        from llmudf.engine.params import Output
        from llmudf.engine.prompts import chat_columns

        if not prompts:
            return []
        parts = max(1, min(self.num_partitions, len(prompts)))
        # contiguous position ranges, one per task: range partitions by send order without a
        # shuffle or a sampling job; the prompts travel with the task's function (Spark
        # broadcasts a large one)
        columns = [chat_columns(p, i) for i, p in enumerate(prompts)]  # (user, system)
        answer = _answer_partition(
            self.config,
            asdict(params),
            [user for user, _ in columns],
            [system for _, system in columns],
        )
        requests = self.spark.range(0, len(prompts), 1, parts)
        table = requests.mapInArrow(answer, _ANSWER_SCHEMA).toArrow().sort_by("i")
        outputs = [
            Output(str(r["i"]), r["text"], [], "stop", r["p"], r["c"], r["g"])
            for r in table.to_pylist()
        ]
        if on_output is not None:
            for i, out in enumerate(outputs):
                on_output(i, out)
        if progress is not None:
            progress(table.num_rows)
        return outputs


def _num_executors(spark) -> int:
    """Executors now up (local mode: 1): one task each. The tasks on one node share its engine
    server, which batches all the prompts it is sent: a batch split among more tasks there
    only reaches it in separate, smaller steps."""
    block_managers = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()
    return max(1, block_managers - 1)  # the driver's is one of them


def task_client(config: Config):
    """The client of a Spark task: the node's engine server for the model (started on first
    use), unless the config names a server endpoint or an OpenAI-compatible one. Shared by
    the batches a Python worker answers."""
    if config.backend == "local":
        config = replace(config, backend="server")
    return get_client(config)


def _answer_rows(client, prompts: list, params: dict) -> list[dict]:
    """Answers as dicts of Output fields; the Flight client needs no torch in the task."""
    if hasattr(client, "generate_rows"):
        return client.generate_rows(prompts, params)
    from llmudf.engine.params import SamplingParams

    return [asdict(o) for o in client.generate(prompts, SamplingParams(**params))]


def _answer_partition(config: Config, params: dict, users: list, systems: list):
    schema = pa.schema(
        [("i", pa.int64()), ("text", pa.string())] + [(n, pa.int32()) for n in ("p", "c", "g")]
    )

    def answer(batches):
        client = task_client(config)
        for batch in batches:
            ids = batch.column(0).to_pylist()
            prompts = [ChatPrompt(users[i], systems[i]).messages() for i in ids]
            rows = _answer_rows(client, prompts, params) if prompts else []
            yield pa.RecordBatch.from_pydict(
                {
                    "i": ids,
                    "text": [r["text"] for r in rows],
                    "p": [r["num_prompt_tokens"] for r in rows],
                    "c": [r["num_cached_tokens"] for r in rows],
                    "g": [r["num_generated_tokens"] for r in rows],
                },
                schema=schema,
            )

    return answer
