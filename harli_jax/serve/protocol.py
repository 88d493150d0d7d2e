"""The wire format of the OpenAI-compatible API.

Request models are strict (``"5"`` is not an int, ``true`` is not a number), as OpenAI's API is,
and ignore fields they do not know, as OpenAI-compatible servers do. Fields of OpenAI's API that
would change the answer and that this server does not implement (``tools``,
``response_format``, ...) are refused (422 naming the field) unless they ask for nothing: a
client must not get an answer that silently ignored them. Response models carry what
the official ``openai`` client reads. What the routes need from the engine and the job manager
is in `harli_jax.serve.contracts`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from harli_jax.engine.sampling import TOP_LOGPROBS

FinishReason = Literal["stop", "length"]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _unsupported(*inert: Any) -> Any:
    """The type of an OpenAI field this server does not implement: only ``None`` or one of the
    ``inert`` values (those that ask for nothing, e.g. an empty ``tools`` list) pass."""

    def check(value: Any) -> Any:
        if value is not None and value not in inert:
            raise ValueError("this server does not support it; leave it out")
        return value

    return Annotated[Any, AfterValidator(check)]


# -- errors ----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- completions and chat --------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    """The fields that completions and chat share; they map onto `SamplingParams`."""

    model: str
    max_tokens: int | None = Field(None, ge=1, description="default: what the context has left")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16, description="choices per prompt")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, description="choice i of a prompt samples with seed + i")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension (as vLLM's): generate past EOS")
    top_k: int = Field(0, ge=-1, description="extension (as vLLM's): 0 or -1 is off")
    min_p: float = Field(0.0, ge=0, le=1, description="extension (as vLLM's): 0 is off")
    min_tokens: int = Field(0, ge=0, description="extension (as vLLM's): no stop before these")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="extension (as vLLM's): token ids that end the output"
    )
    # vLLM's extension this server does not implement: refused unless it asks for nothing.
    repetition_penalty: _unsupported(1, 1.0) = None
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (a string, as JSON keys are) -> added to its logit"
    )

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is not None and not all(key.isdigit() for key in bias):
            raise ValueError("keys must be token ids")
        return bias

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)  # an empty stop string would match at once

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "demo", "prompt": "Hello", "max_tokens": 4}]}
    )

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a batch of texts, token ids, or a batch of token id lists"
    )
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS, description="top alternatives")
    best_of: _unsupported(1) = None
    echo: _unsupported(False) = None
    suffix: _unsupported("") = None


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """The message as chat templates expect it: a "system" role and plain-text content."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    response_format: _unsupported({"type": "text"}) = None
    tools: _unsupported([]) = None
    tool_choice: _unsupported("none") = None
    functions: _unsupported([]) = None
    function_call: _unsupported("none") = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# -- models ----------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# -- files and fine-tuning -------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["processed"] = "processed"  # a stored file has passed validation


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class Hyperparameters(_Request):
    """OpenAI's three, plus the LoRA shape; "auto" (or leaving one out) takes the job's default."""

    n_epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    lora_r: int | None = Field(None, ge=1)
    lora_alpha: float | None = Field(None, gt=0)
    lora_target_modules: list[str] | None = Field(None, min_length=1)

    def chosen(self) -> dict[str, Any]:
        """The values the user set, for the job manager to fill in around."""
        return {k: v for k, v in self.model_dump().items() if v not in (None, "auto")}


class FineTuningJobRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "demo", "training_file": "file-abc"}]}
    )

    model: str
    training_file: str
    hyperparameters: Hyperparameters | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, lt=2**31)


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str = "harli-jax"
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None = None
    result_files: list[str] = []
    trained_tokens: int | None
    error: JobError | None
    seed: int


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: Literal["message"] = "message"


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool
