"""``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI requests in, engine choices
out, as one JSON response or as server-sent events ending in ``data: [DONE]``.

Owns the mapping between the two: prompt forms and chat rendering (with the checkpoint's template,
stopping at its end-of-turn token), ``max_tokens`` against the context, ``n`` choices with seeds
``seed + i``, logprobs in each endpoint's format, and usage counts.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from harli_jax.engine.output import RequestOutput, TokenLogprob
from harli_jax.engine.sampling import SamplingParams
from harli_jax.serve.contracts import ServingEngine
from harli_jax.serve.errors import ERROR_RESPONSES, APIError
from harli_jax.serve.generation import Generation
from harli_jax.serve.metrics import ServerMetrics
from harli_jax.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SamplingRequest,
    TopLogprob,
    Usage,
)

# Each server-sent event: a chunk object as JSON in `data`, the last one "[DONE]".
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}
_STREAM_DOC = {200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}}}
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf
_SEED_SPACE = 2**32  # the engine's PRNG seeds are uint32


def resolve_model(engine: ServingEngine, base: str, model: str) -> str | None:
    """The adapter a request's ``model`` names (None for the base model); 404 if unknown."""
    if model == base:
        return None
    if model in engine.adapters():
        return model
    raise APIError(
        404, f"the model {model!r} does not exist", code="model_not_found", param="model"
    )


class _Vocabulary:
    """Token strings for logprobs, and the chat template's end-of-turn token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end_of_turn = _end_of_turn_ids(tokenizer) if tokenizer is not None else ()

    def token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def encode(self, text: str, param: str) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param=param)
        return self.tokenizer.encode(text)

    def render_chat(self, body: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template", param="model")
        try:
            text = self.tokenizer.apply_chat_template([m.for_template() for m in body.messages])
        except (ValueError, jinja2.TemplateError) as err:  # no template, or raise_exception()
            raise APIError(
                400, f"the chat template refused the messages: {err}", param="messages"
            ) from None
        # The template writes its own special tokens (BOS), as transformers encodes it.
        return self.tokenizer.encode(text, add_special_tokens=False)


def _end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The special token the chat template closes an assistant turn with, if it has one."""
    marker = "harli-end-of-turn-probe"
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    except (ValueError, jinja2.TemplateError):  # no template: each chat request is refused
        return ()
    after = text[text.rfind(marker) + len(marker) :].lstrip()
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    is_special = ids and tokenizer.decode(ids[:1], skip_special_tokens=True) == ""
    return (ids[0],) if is_special else ()


def router(engine: ServingEngine, model_name: str, metrics: ServerMetrics) -> APIRouter:
    api = APIRouter(responses=ERROR_RESPONSES)
    vocab = _Vocabulary(engine.core.tokenizer)

    def start(request: Request, endpoint: str, prompts, params) -> Generation:
        gen = Generation(engine, request, metrics, endpoint)
        gen.submit(prompts, params)
        return gen

    @api.post("/v1/completions", response_model=CompletionResponse, responses=_STREAM_DOC)
    async def completions(body: CompletionRequest, request: Request):
        adapter = resolve_model(engine, model_name, body.model)
        prompts = _completion_prompts(body.prompt, vocab)
        choices = _choices(
            engine,
            body,
            prompts,
            adapter=adapter,
            max_tokens=body.max_tokens,
            default_max_tokens=16,  # OpenAI's default for completions
            logprobs=body.logprobs,
            stop_token_ids=(),
        )
        gen = start(request, "completions", *choices)
        call = _Call("cmpl", body.model, prompts)
        if body.stream:
            return _sse(_completion_events(gen, call, vocab, body))
        finals = await gen.run()
        return CompletionResponse(
            id=call.id,
            created=call.created,
            model=body.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=out.text,
                    logprobs=_completion_logprobs(out.logprobs, vocab, 0),
                    finish_reason=out.finish_reason,
                )
                for i, out in sorted(finals.items())
            ],
            usage=call.usage(finals),
        )

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_STREAM_DOC)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = resolve_model(engine, model_name, body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompts = [vocab.render_chat(body)]
        choices = _choices(
            engine,
            body,
            prompts,
            adapter=adapter,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            default_max_tokens=None,  # chat's default: whatever the context has left
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            stop_token_ids=vocab.end_of_turn,
        )
        gen = start(request, "chat", *choices)
        call = _Call("chatcmpl", body.model, prompts)
        if body.stream:
            return _sse(_chat_events(gen, call, vocab, body, len(choices[0])))
        finals = await gen.run()
        return ChatCompletionResponse(
            id=call.id,
            created=call.created,
            model=body.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=out.text),
                    logprobs=_chat_logprobs(out.logprobs, vocab),
                    finish_reason=out.finish_reason,
                )
                for i, out in sorted(finals.items())
            ],
            usage=call.usage(finals),
        )

    return api


def _completion_prompts(prompt: str | list, vocab: _Vocabulary) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    return [p if isinstance(p, list) else vocab.encode(p, "prompt") for p in prompt]


def _choices(
    engine: ServingEngine,
    body: SamplingRequest,
    prompts: list[list[int]],
    *,
    adapter: str | None,
    max_tokens: int | None,
    default_max_tokens: int | None,
    logprobs: int | None,
    stop_token_ids: tuple[int, ...],
) -> tuple[list[list[int]], list[SamplingParams]]:
    """The (prompt, params) of every choice, ``n`` per prompt: choice index = prompt * n + i."""
    count = len(prompts) * body.n
    if count > engine.max_queued:
        raise APIError(400, f"{count} choices; at most {engine.max_queued} per request", param="n")
    choice_prompts, params = [], []
    for prompt in prompts:
        try:
            engine.core.validate(prompt, SamplingParams())
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from None
        budget = _max_tokens(max_tokens, default_max_tokens, len(prompt), engine.core.max_model_len)
        for i in range(body.n):
            try:
                params.append(
                    SamplingParams(
                        max_tokens=budget,
                        temperature=body.temperature,
                        top_p=body.top_p,
                        top_k=body.top_k,
                        min_p=body.min_p,
                        min_tokens=body.min_tokens,
                        seed=None if body.seed is None else (body.seed + i) % _SEED_SPACE,
                        stop=body.stop_strings,
                        stop_token_ids=stop_token_ids + tuple(body.stop_token_ids or ()),
                        ignore_eos=body.ignore_eos,
                        logprobs=logprobs,
                        presence_penalty=body.presence_penalty,
                        frequency_penalty=body.frequency_penalty,
                        logit_bias=body.logit_bias or (),  # SamplingParams makes keys ints
                        adapter=adapter,
                    )
                )
            except ValueError as err:
                raise APIError(400, str(err).replace("SamplingParams.", "")) from None
            choice_prompts.append(prompt)
    return choice_prompts, params


def _max_tokens(requested: int | None, default: int | None, prompt_len: int, context: int) -> int:
    room = context - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens, but {prompt_len + requested}"
            f" were requested ({prompt_len} in the prompt, {requested} to generate)",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return requested


class _Call:
    """Identity and accounting of one API call."""

    def __init__(self, prefix: str, model: str, prompts: Sequence[list[int]]):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = sum(len(p) for p in prompts)

    def usage(self, finals: dict[int, RequestOutput]) -> Usage:
        completion = sum(len(out.token_ids) for out in finals.values())
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )


def _finite(logprob: float) -> float:
    return max(logprob, _LOGPROB_FLOOR)


def _new_logprobs(out: RequestOutput) -> list[TokenLogprob] | None:
    return (
        None if out.logprobs is None else out.logprobs[len(out.logprobs) - len(out.new_token_ids) :]
    )


def _completion_logprobs(
    entries: list[TokenLogprob] | None, vocab: _Vocabulary, offset: int
) -> CompletionLogprobs | None:
    """``offset``: where in the choice's text the first of ``entries`` starts."""
    if entries is None:
        return None
    tokens = [vocab.token(e.token_id) for e in entries]
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[_finite(e.logprob) for e in entries],
        top_logprobs=[{vocab.token(t): _finite(lp) for t, lp in e.top.items()} for e in entries],
        text_offset=list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset)),
    )


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=_finite(logprob), bytes=list(token.encode()))


def _chat_logprobs(entries: list[TokenLogprob] | None, vocab: _Vocabulary) -> ChatLogprobs | None:
    if entries is None:
        return None
    content = []
    for e in entries:
        token = vocab.token(e.token_id)
        alternatives = [_top(vocab.token(t), lp) for t, lp in e.top.items()]
        content.append(
            ChatTokenLogprob(**_top(token, e.logprob).model_dump(), top_logprobs=alternatives)
        )
    return ChatLogprobs(content=content)


# Characters JSON leaves raw that `str.splitlines` (and clients that split a stream with it, as
# httpx's `iter_lines` does) takes for line ends: raw, they would cut a generated text's event in
# two. In a JSON string the escape is the same text.
_LINE_BREAKING = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def event(chunk: BaseModel) -> str:
    """``chunk`` as one server-sent event: a single ``data:`` line, whatever its text holds."""
    return f"data: {chunk.model_dump_json().translate(_LINE_BREAKING)}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _completion_events(
    gen: Generation, call: _Call, vocab: _Vocabulary, body: CompletionRequest
) -> AsyncIterator[str]:
    offsets: dict[int, int] = {}
    async for index, out in gen.outputs():
        entries = _new_logprobs(out)
        logprobs = _completion_logprobs(entries, vocab, offsets.get(index, 0))
        if logprobs is not None:
            offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs.tokens)
        if out.text_delta or logprobs or out.finished:
            choice = CompletionChoice(
                index=index,
                text=out.text_delta,
                logprobs=logprobs,
                finish_reason=out.finish_reason,
            )
            yield event(
                CompletionResponse(
                    id=call.id, created=call.created, model=call.model, choices=[choice]
                )
            )
    if body.include_usage:
        yield event(
            CompletionResponse(
                id=call.id,
                created=call.created,
                model=call.model,
                choices=[],
                usage=call.usage(gen.finals),
            )
        )
    yield "data: [DONE]\n\n"


async def _chat_events(
    gen: Generation, call: _Call, vocab: _Vocabulary, body: ChatCompletionRequest, count: int
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return event(
            ChatCompletionChunk(
                id=call.id, created=call.created, model=call.model, choices=choices, usage=usage
            )
        )

    for index in range(count):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    async for index, out in gen.outputs():
        logprobs = _chat_logprobs(_new_logprobs(out), vocab)
        if out.text_delta or logprobs or out.finished:
            delta = ChatDelta(content=out.text_delta or None)
            yield chunk(
                [
                    ChatChunkChoice(
                        index=index, delta=delta, logprobs=logprobs, finish_reason=out.finish_reason
                    )
                ]
            )
    if body.include_usage:
        yield chunk([], usage=call.usage(gen.finals))
    yield "data: [DONE]\n\n"
