"""The Engine: requests in, answers out. `step() = schedule -> run -> postprocess`.

Prompt-length policy: a prompt must leave room for at least one generated token within the
context (`EngineConfig.max_model_len`, else the model's maximum, capped by the KV pool). A
longer prompt is a ValueError naming both lengths, unless truncation is asked for
(`EngineConfig.prompt_overflow="truncate_left"` or `SamplingParams(truncate_left=True)`): then
its end is kept, `max_len - max_tokens` tokens of it (at least one). Generation stops with
finish_reason "length" when the context is full.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from llmudf.engine.config import CPU_KV_BYTES_CAP, EngineConfig, free_device_memory
from llmudf.engine.json_schema import JsonPlan, JsonState
from llmudf.engine.kv_pool import KVPool, KVShape
from llmudf.engine.model_runner import ModelRunner, SampledToken
from llmudf.engine.request import Output
from llmudf.engine.request import Sequence as Seq
from llmudf.engine.sampling import ChoiceTrie, SamplingParams
from llmudf.engine.scheduler import Scheduler
from llmudf.prompt import ChatPrompt

Prompt = str | ChatPrompt | Sequence[int]
StreamCallback = Callable[[str, int], None]  # (request_id, new token id)
OutputCallback = Callable[[int, Output], None]  # (prompt index, its Output)


@dataclass(slots=True)
class EngineStats:
    """Counters since the engine started (or `reset_stats`)."""

    num_requests: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_generated_tokens: int = 0
    num_forward_tokens: int = 0  # tokens the model actually ran (recomputation included)
    num_steps: int = 0
    num_preemptions: int = 0
    elapsed_s: float = 0.0  # time spent in step()

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Prompt + generated tokens served per second of engine time."""
        total = self.num_prompt_tokens + self.num_generated_tokens
        return total / self.elapsed_s if self.elapsed_s else 0.0


class Engine:
    """A prefix-sharing LLM engine over one model.

    >>> engine = Engine(EngineConfig(device="cpu"))                      # doctest: +SKIP
    >>> out = engine.generate([ChatPrompt("Is Up a comedy?")],           # doctest: +SKIP
    ...                       SamplingParams(choices=["yes", "no"]))
    >>> out[0].text, engine.stats.prefix_hit_rate                        # doctest: +SKIP
    ('yes', 0.0)
    """

    def __init__(self, config: EngineConfig | None = None):
        from llmudf.engine.weights import load_model

        config = config or EngineConfig()
        model, model_config, tokenizer = load_model(
            config.model, config.torch_device, config.torch_dtype
        )
        self._setup(config, model, model_config, tokenizer)

    @classmethod
    def from_model(cls, model, model_config, tokenizer, config: EngineConfig | None = None):
        """An engine over an already built model (tests share one tiny model this way)."""
        engine = cls.__new__(cls)
        engine._setup(config or EngineConfig(), model, model_config, tokenizer)
        return engine

    def _setup(self, config: EngineConfig, model, model_config, tokenizer) -> None:
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.device = config.torch_device
        shape = KVShape(
            model_config.num_layers,
            model_config.num_kv_heads,
            model_config.head_dim,
            config.page_size,
        )
        dtype = config.torch_dtype
        if config.num_kv_pages is not None:
            self.pool = KVPool(shape, config.num_kv_pages, self.device, dtype)
        else:
            budget = config.kv_cache_bytes
            if budget is None:
                budget = int(free_device_memory(self.device) * config.kv_cache_fraction)
                if self.device.type == "cpu":
                    budget = min(budget, CPU_KV_BYTES_CAP)
            max_pages = -(-self._model_max_len() // config.page_size) * config.max_num_seqs
            budget = min(budget, max_pages * shape.bytes_per_page(dtype))
            self.pool = KVPool.from_budget(shape, budget, self.device, dtype)
        self.max_len = min(self._model_max_len(), self.pool.num_pages * config.page_size)
        self.scheduler = Scheduler(config, self.pool)
        self.runner = ModelRunner(
            model, self.pool, self.device, tokenizer.eos_token_ids, tokenizer.vocab_size
        )
        self.stats = EngineStats()
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._tries: dict[tuple[str, ...], ChoiceTrie] = {}
        self._json_plans: dict[str, JsonPlan] = {}
        self._seqs: dict[str, Seq] = {}
        self._streams: dict[str, StreamCallback] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()

    # ---- the incremental API (the server's loop drives these) ----------------------------

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: StreamCallback | None = None,
    ) -> str:
        """Queues one request and returns its id; `stream(request_id, token_id)` is called for
        each generated token. Raises ValueError for an empty or too long prompt."""
        params = self._fit_max_tokens(params or SamplingParams())
        return self._add(self._encode([prompt])[0], params, request_id, stream)

    def step(self) -> list[Output]:
        """Runs one scheduling step; returns the requests that finished in it."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.num_unfinished:
                raise RuntimeError("the scheduler could not make progress (KV pool too small?)")
            return []
        sampled = self.runner.run(batch)
        self.scheduler.commit(batch)
        outputs = [out for s in sampled if (out := self._postprocess(s)) is not None]
        self.stats.num_steps += 1
        self.stats.num_forward_tokens += batch.num_tokens
        self.stats.num_preemptions = self.scheduler.num_preemptions
        self.stats.elapsed_s += time.perf_counter() - start
        return outputs

    def abort(self, request_id: str) -> None:
        """Drops a request that has not finished (no Output is produced for it)."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)
            self._streams.pop(request_id, None)

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    # ---- the batch API --------------------------------------------------------------------

    def generate(
        self,
        prompts,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool | Callable[[int, int], None] | None = None,
        on_output: OutputCallback | None = None,
    ) -> list[Output]:
        """Answers every prompt; outputs come back in input order.

        prompts: a list of str (already chat-templated text), ChatPrompt (the model's chat
        template is applied), or token-id lists; or a pyarrow Table with a `prompt` column
        (templated text) or a `user` column (+ optional `system`). params: one SamplingParams
        for all, or one per prompt. progress: True for a tqdm bar, or a callable
        `(num_done, num_total)`. on_output: called `(prompt index, Output)` as each prompt is
        answered, before `progress` hears of it. If anything raises meanwhile (a callback, the
        model, KeyboardInterrupt), the unfinished requests are aborted and their KV freed, so
        the engine is idle again; the exception propagates unchanged.

        >>> engine.generate(["<|im_start|>user\\nHi<|im_end|>\\n"],       # doctest: +SKIP
        ...                 SamplingParams(max_tokens=4))[0].finish_reason
        'length'
        """
        if self.num_unfinished:
            raise RuntimeError(
                f"generate() needs an idle engine; {self.num_unfinished} requests added with "
                "add_request are unfinished"
            )
        token_lists = self._encode(_prompt_list(prompts))
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(token_lists)
        else:
            params_list = list(params)
            if len(params_list) != len(token_lists):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(token_lists)} prompts"
                )
        distinct = list(dict.fromkeys(params_list))  # one warning per distinct params
        fitted = dict(zip(distinct, map(self._fit_max_tokens, distinct), strict=True))
        params_list = [fitted[p] for p in params_list]
        for i, (tokens, p) in enumerate(zip(token_lists, params_list, strict=True)):
            self._check_length(tokens, p, i)  # fail before anything is queued
        ids: list[str] = []
        done: dict[str, Output] = {}
        report = _progress_reporter(progress, len(token_lists))
        try:
            for t, p in zip(token_lists, params_list, strict=True):
                ids.append(self._add(t, p, None, None))
            index = {request_id: i for i, request_id in enumerate(ids)}
            while self.num_unfinished:
                for out in self.step():
                    done[out.request_id] = out
                    if on_output is not None:
                        on_output(index[out.request_id], out)
                report(len(done))
        finally:
            for request_id in ids:  # a no-op for the finished ones
                self.abort(request_id)
            report(None)
        return [done[i] for i in ids]

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    # ---- private helpers --------------------------------------------------------------

    def _model_max_len(self) -> int:
        return self.config.max_model_len or self.model_config.max_position_embeddings

    def _fit_max_tokens(self, params: SamplingParams) -> SamplingParams:
        # generation stops when the context is full anyway; an unreachable max_tokens is most
        # likely a typo or a unit mix-up, so say so instead of silently running to the end
        if params.max_tokens <= self.max_len:
            return params
        warnings.warn(
            f"max_tokens={params.max_tokens} is more than the model's context of "
            f"{self.max_len} tokens; capped at {self.max_len}",
            stacklevel=3,
        )
        return replace(params, max_tokens=self.max_len)

    def _encode(self, prompts: list) -> list[list[int]]:
        """Token ids of each prompt. A ChatPrompt goes through `Tokenizer.encode_chat`, so
        special-token text in its content (row data, instruction, system prompt) stays plain
        text; a str is already templated text, and its special-token text is matched as is."""
        out: list[list[int] | None] = [None] * len(prompts)
        chats: dict[int, list[dict]] = {}
        texts: dict[int, str] = {}
        for i, p in enumerate(prompts):
            if isinstance(p, ChatPrompt):
                chats[i] = p.messages()
            elif isinstance(p, str):
                if not p:
                    raise ValueError(f"prompt {i} is empty")
                texts[i] = p
            elif isinstance(p, Sequence | torch.Tensor) and not isinstance(p, bytes):
                out[i] = self._check_token_ids(list(p), i)
            else:
                raise TypeError(
                    f"prompt {i} is a {type(p).__name__}; expected str, ChatPrompt or token ids"
                )
        encoded = [
            *zip(chats, self.tokenizer.encode_chat_batch(list(chats.values())), strict=True),
            *zip(texts, self.tokenizer.encode_batch(list(texts.values())), strict=True),
        ]
        for i, ids in encoded:
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization")
            out[i] = ids
        return out

    def _check_token_ids(self, ids: list, index: int) -> list[int]:
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        ids = [int(t) for t in ids]
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab})")
        return ids

    def _check_length(self, ids: list[int], params: SamplingParams, index) -> list[int]:
        if len(ids) < self.max_len:
            return ids
        truncate = params.truncate_left
        if truncate is None:
            truncate = self.config.prompt_overflow == "truncate_left"
        if not truncate:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens but the context holds {self.max_len} "
                "(prompt + at least one generated token); shorten it, or ask for truncation "
                "with SamplingParams(truncate_left=True) or "
                "EngineConfig(prompt_overflow='truncate_left')"
            )
        return ids[-max(1, self.max_len - params.max_tokens) :]

    def _add(self, ids: list[int], params: SamplingParams, request_id, stream) -> str:
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self._check_length(ids, params, request_id)
        trie = None
        if params.choices is not None:
            trie = self._tries.get(params.choices)
            if trie is None:
                trie = ChoiceTrie.build(params.choices, self.tokenizer.encode)
                self._tries[params.choices] = trie
        json_state = None
        if params.json_schema is not None:
            plan = self._json_plans.get(params.json_schema)
            if plan is None:
                plan = JsonPlan.build(
                    json.loads(params.json_schema),
                    self.tokenizer.encode,
                    self.tokenizer.token_strings,
                )
                self._json_plans[params.json_schema] = plan
            json_state = JsonState(plan)
        arrival = next(self._arrivals)
        seq = Seq(request_id, arrival, ids, params, self.max_len, trie and trie.root, json_state)
        self._seqs[request_id] = seq
        if stream is not None:
            self._streams[request_id] = stream
        self.scheduler.add(seq)
        return request_id

    def _postprocess(self, sampled: SampledToken) -> Output | None:
        seq = sampled.seq
        finish = self._advance(seq, sampled.token_id, sampled.logprob)
        if finish is None:
            return None
        seq.finish_reason = finish
        self.scheduler.finish(seq)
        del self._seqs[seq.request_id]
        self._streams.pop(seq.request_id, None)
        stats = self.stats
        stats.num_requests += 1
        stats.num_prompt_tokens += seq.num_prompt_tokens
        stats.num_cached_tokens += seq.num_cached_tokens
        stats.num_generated_tokens += seq.num_generated_tokens
        return seq.to_output()

    def _advance(self, seq: Seq, token: int, logprob: float | None) -> str | None:
        """Takes the sampled token; returns the finish reason (and sets seq.text) if done."""
        params = seq.params
        if seq.trie_node is not None:  # constrained to choices
            node = seq.trie_node
            if token in self._eos and node.choice is not None:
                seq.text = node.choice
                return "stop"
            seq.trie_node = node = node.children[token]
            self._append(seq, token, logprob)
            if not node.children:
                seq.text = node.choice
                return "stop"
            if len(seq) >= seq.max_len:
                seq.text = self.tokenizer.decode(seq.generated_ids)
                return "length"
            return None
        if seq.json_state is not None:  # constrained to a JSON object
            self._append(seq, token, logprob)
            if seq.json_state.advance(token):
                seq.text = self.tokenizer.decode(seq.generated_ids)
                return "stop"
            if len(seq) >= seq.max_len:
                seq.text = self.tokenizer.decode(seq.generated_ids)
                return "length"
            return None
        if (token in self._eos and not params.ignore_eos) or token in params.stop_token_ids:
            seq.text = self.tokenizer.decode(seq.generated_ids)
            return "stop"
        self._append(seq, token, logprob)
        if params.stop:
            text = self.tokenizer.decode(seq.generated_ids)
            cut = min((i for stop in params.stop if (i := text.find(stop)) >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                return "stop"
        if seq.num_generated_tokens >= params.max_tokens or len(seq) >= seq.max_len:
            seq.text = self.tokenizer.decode(seq.generated_ids)
            return "length"
        return None

    def _append(self, seq: Seq, token: int, logprob: float | None) -> None:
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        stream = self._streams.get(seq.request_id)
        if stream is not None:
            stream(seq.request_id, token)


def _prompt_list(prompts) -> list:
    import pyarrow as pa

    if isinstance(prompts, pa.Table):
        names = prompts.column_names
        if "prompt" in names:
            return prompts.column("prompt").to_pylist()
        if "user" in names:
            users = prompts.column("user").to_pylist()
            if "system" in names:
                systems = prompts.column("system").to_pylist()
                return [ChatPrompt(u, s) for u, s in zip(users, systems, strict=True)]
            return [ChatPrompt(u) for u in users]
        raise ValueError(
            f"an Arrow table of prompts needs a 'prompt' or 'user' column, got {names}"
        )
    if isinstance(prompts, str | ChatPrompt):
        raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list")
    return list(prompts)


def _progress_reporter(progress, total: int) -> Callable[[int | None], None]:
    """A function called with the number done after each step, and None at the end."""
    if not progress:
        return lambda done: None
    if callable(progress):
        return lambda done: done is not None and progress(done, total)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="req")

    def report(done: int | None) -> None:
        if done is None:
            bar.close()
        else:
            bar.update(done - bar.n)

    return report
