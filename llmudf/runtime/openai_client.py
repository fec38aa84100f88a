"""An EngineClient over any OpenAI-compatible endpoint (vLLM, SGLang, a hosted API, or
`llmudf serve --http-port`), with the official `openai` package.

Each prompt is one chat completion; up to `max_concurrency` are in flight at once. A
connection error, timeout, 429 or 5xx is retried `max_retries` times with exponential
backoff and jitter; then the call fails with an `EndpointError` naming the endpoint. Choice
constraints go out as `guided_choice` (vLLM / SGLang / llmudf); an endpoint without them
answers free text, which the caller's parser then maps.

>>> client = OpenAIClient("http://127.0.0.1:8000/v1", model="smollm2")   # doctest: +SKIP
>>> chat = [{"role": "user", "content": "Say hi"}]
>>> client.generate([chat], SamplingParams())[0].text                   # doctest: +SKIP
'Hi'
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from llmudf.engine.params import Output
from llmudf.engine.prompts import check_chat, is_chat


class EndpointError(RuntimeError):
    """The OpenAI-compatible endpoint is down, or kept failing after the retries."""


@dataclass(slots=True)
class OpenAIConfig:
    """Where the endpoint is and how hard to try.

    base_url: e.g. "http://127.0.0.1:8000/v1". api_key: None = $OPENAI_API_KEY, or "none".
    timeout: seconds per request. backoff: the first retry's delay in seconds (doubles).

    >>> OpenAIConfig("http://127.0.0.1:8000/v1", model="smollm2").max_concurrency
    8
    """

    base_url: str
    model: str
    api_key: str | None = None
    max_concurrency: int = 8
    max_retries: int = 3
    backoff: float = 0.5
    timeout: float = 120.0

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must name the endpoint's model (see its /v1/models)")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


def first_model(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The first model an OpenAI-compatible endpoint lists (`GET /v1/models`).

    >>> first_model("http://127.0.0.1:8000/v1")                          # doctest: +SKIP
    'smollm2'
    """
    import openai

    client = openai.OpenAI(
        base_url=base_url,
        api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
        timeout=timeout,
        max_retries=2,
    )
    try:
        models = [m.id for m in client.models.list()]
    except openai.APIError as exc:
        raise EndpointError(
            f"OpenAI-compatible endpoint {base_url} did not list its models "
            f"({type(exc).__name__}: {exc}); is it up? or give model= explicitly"
        ) from exc
    finally:
        client.close()
    if not models:
        raise EndpointError(f"OpenAI-compatible endpoint {base_url} lists no models")
    return models[0]


class OpenAIClient:
    """Answers prompts through an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, base_url: str, model: str, **options):
        import openai  # optional dependency: pip install 'llmudf[openai]'

        self.config = OpenAIConfig(base_url, model, **options)
        self._openai = openai
        api_key = self.config.api_key or os.environ.get("OPENAI_API_KEY") or "none"
        # retries are ours (below), so the count and the backoff are known and bounded
        self._client = openai.OpenAI(
            base_url=self.config.base_url,
            api_key=api_key,
            timeout=self.config.timeout,
            max_retries=0,
        )
        self._retryable = (
            openai.APIConnectionError,
            openai.APITimeoutError,
            openai.RateLimitError,
            openai.InternalServerError,
        )
        self.num_retries = 0
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return f"openai:{self.config.base_url}#{self.config.model}"

    def generate(self, prompts: list, params, progress=None, on_output=None) -> list[Output]:
        """One Output per chat (a list of message dicts), in prompt order. `on_output(index,
        output)` and then `progress(1)` are called as each answer arrives."""
        for i, p in enumerate(prompts):
            if not is_chat(p):
                raise TypeError(
                    f"prompt {i} is a {type(p).__name__}; the openai backend takes a chat "
                    "(a list of message dicts)"
                )
            check_chat(p, i)
        if not prompts:
            return []
        lock = threading.Lock()  # callbacks run one at a time, as in the other clients

        def one(index_prompt):
            index, prompt = index_prompt
            out = self._complete(index, prompt, params)
            with lock:
                if on_output is not None:
                    on_output(index, out)
                if progress is not None:
                    progress(1)
            return out

        workers = min(self.config.max_concurrency, len(prompts))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmudf-openai") as pool:
            return list(pool.map(one, enumerate(prompts)))

    # ---- private -------------------------------------------------------------------------

    def _complete(self, index: int, messages: list[dict], params) -> Output:
        request = self._request(messages, params)
        for attempt in range(self.config.max_retries + 1):
            try:
                response = self._client.chat.completions.create(**request)
                break
            except self._retryable as exc:
                if attempt == self.config.max_retries:
                    raise EndpointError(
                        f"OpenAI-compatible endpoint {self.config.base_url} failed "
                        f"{attempt + 1} times ({type(exc).__name__}: {exc}); is it up?"
                    ) from exc
                with self._lock:
                    self.num_retries += 1
                delay = self.config.backoff * 2**attempt
                time.sleep(delay * (0.5 + random.random()))
            except self._openai.APIStatusError as exc:  # 4xx: retrying will not help
                raise EndpointError(
                    f"OpenAI-compatible endpoint {self.config.base_url} rejected the request "
                    f"({exc.status_code}): {exc.message}"
                ) from exc
        choice = response.choices[0]
        usage = response.usage
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        return Output(
            request_id=str(index),
            text=choice.message.content or "",
            token_ids=[],
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            num_prompt_tokens=usage.prompt_tokens if usage else 0,
            num_cached_tokens=(getattr(details, "cached_tokens", 0) or 0) if details else 0,
            num_generated_tokens=usage.completion_tokens if usage else 0,
        )

    def _request(self, messages: list[dict], params) -> dict:
        request = {
            "model": self.config.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            request["seed"] = params.seed
        if params.stop:
            request["stop"] = list(params.stop)
        extra = {}
        if params.top_k:
            extra["top_k"] = params.top_k
        if params.choices is not None:
            extra["guided_choice"] = list(params.choices)
        if extra:
            request["extra_body"] = extra
        return request
