"""The Engine: requests in, answers out. `step() = schedule -> run -> postprocess`.

Prompts are chats (message lists), templated text or token ids (engine/prompts.py).

Prompt-length policy: a prompt must leave room for at least one generated token within the
context (`EngineConfig.max_model_len`, else the model's maximum, capped by the KV pool). A
longer prompt is a ValueError naming both lengths, unless truncation is asked for
(`EngineConfig.prompt_overflow="truncate_left"` or `SamplingParams(truncate_left=True)`): then
its end is kept, `max_len - max_tokens` tokens of it (at least one). Generation stops with
finish_reason "length" when the context is full.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields, replace

from llmudf.engine.config import EngineConfig
from llmudf.engine.constraints import Constraint, ConstraintCompiler
from llmudf.engine.detokenizer import Detokenizer
from llmudf.engine.host_kv import HostKVPool, KVCopier
from llmudf.engine.kv_pool import KVPool, KVShape
from llmudf.engine.model_runner import ModelRunner, SampledToken
from llmudf.engine.params import EngineStats, FinishReason, Output, SamplingParams
from llmudf.engine.progress import progress_reporter
from llmudf.engine.prompts import Prompt, encode_prompts, prompt_list
from llmudf.engine.request import Sequence as Seq
from llmudf.engine.scheduler import Scheduler

StreamCallback = Callable[[str, int], None]  # (request_id, new token id)
OutputCallback = Callable[[int, Output], None]  # (prompt index, its Output)


class Engine:
    """A prefix-sharing LLM engine over one model.

    config.model is loaded, unless an already built `model` (its `.config` a ModelConfig) and
    its `tokenizer` are given (tests share one tiny model this way).

    >>> engine = Engine(EngineConfig(device="cpu"))                              # doctest: +SKIP
    >>> chat = [{"role": "user", "content": "Is Up a comedy?"}]
    >>> out = engine.generate([chat], SamplingParams(choices=["yes", "no"]))     # doctest: +SKIP
    >>> out[0].text, engine.stats.prefix_hit_rate                                # doctest: +SKIP
    ('yes', 0.0)
    """

    def __init__(self, config: EngineConfig | None = None, *, model=None, tokenizer=None):
        config = config or EngineConfig()
        if (model is None) != (tokenizer is None):
            raise ValueError("give both model and tokenizer, or neither to load config.model")
        if model is None:
            from llmudf.engine.weights import load_model

            model, _, tokenizer = load_model(
                config.model,
                config.torch_device,
                config.torch_dtype,
                config.kernels,
                config.deterministic,
            )
        self.config = config
        self.model_config = model_config = model.config
        self.tokenizer = tokenizer
        self.device = config.torch_device
        model_max_len = config.max_model_len or model_config.max_position_embeddings
        shape = KVShape(
            model_config.num_layers,
            model_config.num_kv_heads,
            model_config.head_dim,
            config.page_size,
        )
        self.pool = KVPool.from_config(config, shape, model_max_len)
        self.max_len = min(model_max_len, self.pool.num_pages * config.page_size)
        # the host tier under the prefix cache (and the KV of CPU-attended decodes)
        self.host_pool = HostKVPool.from_config(config, self.pool)
        self.copier = None if self.host_pool is None else KVCopier(self.pool, self.host_pool)
        self.scheduler = Scheduler(config, self.pool, self.copier)
        self.runner = ModelRunner(
            model,
            self.pool,
            self.device,
            tokenizer.vocab_size,
            self.copier,
            cuda_graph_max_batch=config.cuda_graph_max_batch,
        )
        self.constraints = ConstraintCompiler(tokenizer)
        self.stats = EngineStats()
        self._eos = frozenset(tokenizer.eos_token_ids)
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
        ids = encode_prompts([prompt], self.tokenizer, self.model_config.vocab_size)[0]
        return self._add(ids, params, request_id, stream)

    def step(self) -> list[Output]:
        """Runs one scheduling step; returns the requests that finished in it."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.num_unfinished:
                raise RuntimeError("the scheduler could not make progress (KV pool too small?)")
            return []
        if self.copier is not None:
            self.copier.before_forward()
        sampled = self.runner.run(batch)
        self.scheduler.commit(batch)
        outputs = [out for s in sampled if (out := self._postprocess(s)) is not None]
        self.stats.num_steps += 1
        self.stats.num_forward_tokens += batch.num_tokens
        self.stats.num_preemptions = self.scheduler.num_preemptions
        counters = self.scheduler.take_counters()
        for f in fields(counters):
            setattr(self.stats, f.name, getattr(self.stats, f.name) + getattr(counters, f.name))
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

        prompts: a list of chats (`[{"role": "user", "content": "Hi"}]`; the model's chat
        template is applied), str (already templated text) or token-id lists; or a pyarrow
        Table with a `prompt` column (templated text) or a `user` column (+ optional
        `system`). params: one SamplingParams for all, or one per prompt. progress: True for
        a tqdm bar, or a callable `(num_done, num_total)`. on_output: called `(prompt index,
        Output)` as each prompt is answered, before `progress` hears of it. If anything
        raises meanwhile (a callback, the model, KeyboardInterrupt), the unfinished requests
        are aborted and their KV freed, so the engine is idle again; the exception
        propagates unchanged.

        >>> engine.generate(["<|im_start|>user\\nHi<|im_end|>\\n"],       # doctest: +SKIP
        ...                 SamplingParams(max_tokens=4))[0].finish_reason
        'length'
        """
        if self.num_unfinished:
            raise RuntimeError(
                f"generate() needs an idle engine; {self.num_unfinished} requests added with "
                "add_request are unfinished"
            )
        token_lists = encode_prompts(
            prompt_list(prompts), self.tokenizer, self.model_config.vocab_size
        )
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
        report = progress_reporter(progress, len(token_lists))
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
        constraint = self.constraints.compile(params)
        detokenizer = None
        if params.stop and constraint is None:
            detokenizer = Detokenizer(self.tokenizer.decode, params.stop)
        end_ids = self._end_token_ids(params, constraint)
        arrival = next(self._arrivals)
        seq = Seq(request_id, arrival, ids, params, self.max_len, end_ids, constraint, detokenizer)
        self._seqs[request_id] = seq
        if stream is not None:
            self._streams[request_id] = stream
        self.scheduler.add(seq)
        return request_id

    def _end_token_ids(self, params: SamplingParams, constraint: Constraint | None) -> frozenset:
        # a constraint allows EOS only where its answer may end; ignore_eos and stop tokens
        # are for free text
        if constraint is not None:
            return self._eos
        eos = frozenset() if params.ignore_eos else self._eos
        return eos | frozenset(params.stop_token_ids)

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

    def _advance(self, seq: Seq, token: int, logprob: float | None) -> FinishReason | None:
        """Takes the sampled token; returns the finish reason (and sets seq.text) if done."""
        if token in seq.end_token_ids:  # EOS or a stop token: the answer ends before it
            seq.text = self._answer_text(seq)
            return "stop"
        self._append(seq, token, logprob)
        if seq.constraint is not None:
            if seq.constraint.advance(token):
                seq.text = self._answer_text(seq)
                return "stop"
        else:
            if seq.detokenizer is not None:
                text = seq.detokenizer.append(token)
                if text is not None:
                    seq.text = text
                    return "stop"
            if seq.num_generated_tokens >= seq.params.max_tokens:
                seq.text = self.tokenizer.decode(seq.generated_ids)
                return "length"
        if len(seq) >= seq.max_len:
            seq.text = self.tokenizer.decode(seq.generated_ids)
            return "length"
        return None

    def _answer_text(self, seq: Seq) -> str:
        answer = seq.constraint.answer if seq.constraint is not None else None
        return answer if answer is not None else self.tokenizer.decode(seq.generated_ids)

    def _append(self, seq: Seq, token: int, logprob: float | None) -> None:
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        stream = self._streams.get(seq.request_id)
        if stream is not None:
            stream(seq.request_id, token)
