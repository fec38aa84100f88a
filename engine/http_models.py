"""The request and response bodies of the OpenAI-compatible HTTP API, as pydantic models.

FastAPI validates requests against them (a bad body is a 400 naming the field) and builds the
OpenAPI schema from them, which the fuzz test generates requests from. Fields the engine does
not use (`frequency_penalty`, `logit_bias`, ...) are accepted and ignored, as OpenAI clients
send them; bounds keep every accepted value safe for the engine (a temperature of 1e300 or a
top_k past int64 would fail a whole engine step, and with it other clients' requests).

>>> CompletionRequest(prompt="hi", max_tokens=4).prompts
['hi']
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPTS = 256  # per /v1/completions request
MAX_STOP = 16
MAX_CHOICES = 256
_Text = Annotated[str, Field(max_length=4096)]
_Prompt = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=(1 << 31) - 1)
    seed: int | None = Field(None, ge=0, le=(1 << 63) - 1)
    stop: _Text | Annotated[list[_Text], Field(max_length=MAX_STOP)] | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="the client, for fair share")
    ignore_eos: bool | None = None
    guided_choice: list[_Text] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES, description="the answer is one of these"
    )


class CompletionRequest(_Request):
    prompt: _Prompt | Annotated[list[_Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        ..., description="one prompt or a list of them"
    )

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)


# ---- responses (for the schema; the routes build them as dicts) ---------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "dead"]
    error: str | None = None


class Ready(BaseModel):
    ready: bool
    model: str
