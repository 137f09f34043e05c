"""One fake instance: what it keeps (recorded requests, the models it was asked for) and how
each endpoint answers, paced and faulted as the request's settings say."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from aiohttp import web

from . import anthropic, azure, bedrock, chat_tools, gemini
from .faults import (
    Aborted,
    non_stream_fault,
    open_event_stream,
    pause,
    pre_response_fault,
    sleep_until,
)
from .identity import Issuer
from .safety import (
    DEFAULT_MODERATION_MODEL,
    directives,
    judge,
    message_texts,
    moderation_inputs,
    moderation_result,
    prompt_text,
    safety_kind,
    webhook_reply,
)
from .settings import INSTANCE_HEADER, FakeLLMSettings, RequestSettings, request_settings
from .wire import (
    DEFAULT_MODEL,
    DONE,
    MALFORMED,
    MAX_EMBEDDING_DIMENSIONS,
    SLOT,
    SYSTEM_FINGERPRINT,
    VOCAB,
    RequestError,
    chat_prompt_bytes,
    chat_usage,
    completion_length,
    content,
    embedding,
    error_response,
    estimate_tokens,
    is_int,
    json_response,
    parse_body,
    parse_inputs,
    require_model,
    require_object,
    sse,
    sse_template,
    stream_flags,
    text_pieces,
)

# Bounds memory when a benchmark sprays many distinct model names.
_MAX_TRACKED_MODELS = 1024

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Endpoint = Callable[[web.Request, RequestSettings, Any], Awaitable[web.StreamResponse]]


class FakeLLM:
    def __init__(self, settings: FakeLLMSettings) -> None:
        self.settings = settings
        self.records: deque[dict[str, Any]] = deque(maxlen=settings.record_limit)
        self.models: OrderedDict[str, None] = OrderedDict()
        self.created = int(time.time())
        self.bedrock_cache = bedrock.PromptCache()
        self.issuer = Issuer()  # the identity tokens it issued (identity.py)

    # ----- plumbing

    async def stamp_instance(self, _request: web.Request, response: web.StreamResponse) -> None:
        response.headers[INSTANCE_HEADER] = self.settings.name

    def record(self, request: web.Request, body: Any) -> None:
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            name = key.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.records.append(
            {
                "path": request.path,
                "method": request.method,
                "headers": headers,
                "body": None if body is MALFORMED else body,
                "instance": self.settings.name,
            }
        )

    def note_model(self, model: str) -> None:
        if model in self.models:
            return
        if len(self.models) >= _MAX_TRACKED_MODELS:
            self.models.popitem(last=False)
        self.models[model] = None

    async def observe(self, request: web.Request) -> Any:
        body = parse_body(await request.read())
        if self.records.maxlen:
            self.record(request, body)
        if isinstance(body, dict) and isinstance(model := body.get("model"), str) and model:
            self.note_model(model)
        return body

    @web.middleware
    async def record_unrouted(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        # Routed /v1 requests are recorded by their endpoint wrapper; this catches 404/405s.
        if request.match_info.http_exception is not None and request.path.startswith("/v1/"):
            await self.observe(request)
        return await handler(request)

    def v1(self, endpoint: _Endpoint) -> _Handler:
        """Wrap an endpoint with recording, header overrides and fault injection."""

        async def handler(request: web.Request) -> web.StreamResponse:
            body = await self.observe(request)
            try:
                ctx = request_settings(self.settings, request.headers)
                if ctx.fault is not None and ctx.fault.after is None:
                    early = await pre_response_fault(
                        request, ctx.fault, self.settings.stall_seconds
                    )
                    if early is not None:
                        return early
                return await endpoint(request, ctx, body)
            except RequestError as exc:
                return error_response(exc.status, exc.message, param=exc.param, code=exc.code)
            except (Aborted, ConnectionError):
                # The socket is gone; aiohttp fails to write this and drops it as a client
                # disconnect, without the error log a raised exception would produce.
                return web.Response()

        return handler

    async def wait_generation(
        self, request: web.Request, ctx: RequestSettings, tokens: int
    ) -> None:
        # A non-streaming answer arrives when the whole completion would have been generated,
        # so streaming and non-streaming benchmarks see the same end-to-end latency.
        delay = ctx.ttft
        if ctx.tokens_per_second > 0 and tokens > 1:
            delay += (tokens - 1) / ctx.tokens_per_second
        await pause(request, delay)

    async def stream(
        self,
        request: web.Request,
        ctx: RequestSettings,
        head: Iterable[bytes],
        tokens: int,
        token_events: Callable[[int], Iterable[bytes]],
        tail: Iterable[bytes],
    ) -> web.StreamResponse:
        response, out, first_token_at = await open_event_stream(
            request, ctx.ttft, ctx.fault, self.settings.stall_seconds
        )
        for event in head:
            await out.send(event)
        tps = ctx.tokens_per_second
        for i in range(tokens):
            if tps > 0 and i:
                await sleep_until(request, first_token_at + out.stalled + i / tps)
            for event in token_events(i):
                await out.send(event)
        for event in tail:
            await out.send(event)
        await out.send(DONE, last=True)
        if ctx.linger:
            await pause(request, ctx.linger)
        await response.write_eof()
        return response

    # ----- endpoints

    async def chat_completions(
        self, request: web.Request, ctx: RequestSettings, raw_body: Any
    ) -> web.StreamResponse:
        body = require_object(raw_body)
        model = require_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(
                "'messages' must be a non-empty array", param="messages", code="invalid_type"
            )
        stream, include_usage = stream_flags(body)
        include_usage = include_usage and not ctx.no_usage
        count, finish_reason = completion_length(
            body, ("max_completion_tokens", "max_tokens"), ctx.tokens
        )
        prompt_tokens = estimate_tokens(chat_prompt_bytes(messages))
        chat_tools.check_request(body, messages)
        kind = safety_kind(model)
        verdict = None if kind is None else judge(kind, message_texts(messages))
        if verdict is None:
            calls = chat_tools.forced_calls(body, request.headers)
            if calls is not None:
                return await self.chat_tool_calls(
                    request, ctx, model, (stream, include_usage), prompt_tokens, calls
                )
        pieces: list[str] | None = None
        if verdict is None and ctx.text is not None:
            pieces = text_pieces(ctx.text, ctx.chunk_chars)
            count, finish_reason = len(pieces), "stop"
        if verdict is None:
            completion_tokens = count
        else:
            # A safety model answers with its whole verdict, as one token event when streamed.
            await pause(request, verdict[1])
            count, finish_reason = 1, "stop"
            completion_tokens = estimate_tokens(len(verdict[0].encode()))
        usage = chat_usage(prompt_tokens, completion_tokens, ctx.reasoning_tokens)
        common = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if stream else "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if not stream:
            await self.wait_generation(request, ctx, count)
            await non_stream_fault(request, ctx.fault, self.settings.stall_seconds)
            return json_response(
                {
                    **common,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": verdict[0]
                                if verdict is not None
                                else ctx.text
                                if ctx.text is not None
                                else content(count),
                                "refusal": None,
                            },
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    **({} if ctx.no_usage else {"usage": usage}),
                    "service_tier": "default",
                }
            )

        base = common
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        prefix, suffix = sse_template(chunk({"content": SLOT}, None))
        if pieces is not None:
            encoded = [orjson.dumps(piece) for piece in pieces]
        elif verdict is None:
            VOCAB.ensure(count)
            encoded = VOCAB.encoded
        else:
            encoded = [orjson.dumps(verdict[0])]
        tail = [sse(chunk({}, finish_reason))]
        if include_usage:
            tail.append(sse({**base, "choices": [], "usage": usage}))
        return await self.stream(
            request,
            ctx,
            [sse(chunk({"role": "assistant", "content": ""}, None))],
            count,
            lambda i: (prefix + encoded[i] + suffix,),
            tail,
        )

    async def chat_tool_calls(
        self,
        request: web.Request,
        ctx: RequestSettings,
        model: str,
        flags: tuple[bool, bool],
        prompt_tokens: int,
        calls: list[chat_tools.ToolCall],
    ) -> web.StreamResponse:
        """A chat answer that calls tools (chat_tools.py), paced like a text answer: each
        streamed chunk of the calls as one token."""
        stream, include_usage = flags
        deltas = chat_tools.stream_deltas(calls)
        usage = chat_usage(prompt_tokens, chat_tools.completion_tokens(calls), ctx.reasoning_tokens)
        common = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if stream else "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if not stream:
            await self.wait_generation(request, ctx, len(deltas))
            await non_stream_fault(request, ctx.fault, self.settings.stall_seconds)
            choice = {
                "index": 0,
                "message": chat_tools.message(calls),
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
            return json_response(
                {
                    **common,
                    "choices": [choice],
                    **({} if ctx.no_usage else {"usage": usage}),
                    "service_tier": "default",
                }
            )

        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse({**common, "choices": [choice], **extra})

        events = [chunk(delta, None) for delta in deltas]
        tail = [chunk({}, "tool_calls")]
        if include_usage:
            tail.append(sse({**common, "choices": [], "usage": usage}))
        return await self.stream(request, ctx, (), len(events), lambda i: (events[i],), tail)

    async def completions(
        self, request: web.Request, ctx: RequestSettings, raw_body: Any
    ) -> web.StreamResponse:
        body = require_object(raw_body)
        model = require_model(body)
        prompt = body.get("prompt")
        # OpenAI treats a missing prompt as <|endoftext|>.
        prompts = [(1, b"")] if prompt is None else parse_inputs(prompt, "prompt")
        stream, include_usage = stream_flags(body)
        include_usage = include_usage and not ctx.no_usage
        count, finish_reason = completion_length(body, ("max_tokens",), ctx.tokens)
        prompt_tokens = sum(tokens for tokens, _ in prompts)
        completion_tokens = count * len(prompts)
        replies: list[str] | None = None
        if (kind := safety_kind(model)) is not None:
            verdicts = [judge(kind, [("user", prompt_text(i))]) for _, i in prompts]
            replies = [reply for reply, _ in verdicts]
            await pause(request, max(delay for _, delay in verdicts))
            count, finish_reason = 1, "stop"
            completion_tokens = sum(estimate_tokens(len(r.encode())) for r in replies)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        common = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if not stream:
            await self.wait_generation(request, ctx, count)
            await non_stream_fault(request, ctx.fault, self.settings.stall_seconds)
            texts = [content(count)] * len(prompts) if replies is None else replies
            choices = [
                {"text": text, "index": i, "logprobs": None, "finish_reason": finish_reason}
                for i, text in enumerate(texts)
            ]
            usage_field = {} if ctx.no_usage else {"usage": usage}
            return json_response({**common, "choices": choices, **usage_field})

        extra = {"usage": None} if include_usage else {}

        def chunk(text: str, index: int, finish: str | None) -> dict[str, Any]:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            return {**common, "choices": [choice], **extra}

        templates = [sse_template(chunk(SLOT, i, None)) for i in range(len(prompts))]
        if replies is None:
            VOCAB.ensure(count)
            encoded = VOCAB.encoded

            def events(i: int) -> list[bytes]:
                return [prefix + encoded[i] + suffix for prefix, suffix in templates]
        else:
            fixed = [
                prefix + orjson.dumps(reply) + suffix
                for (prefix, suffix), reply in zip(templates, replies, strict=True)
            ]

            def events(i: int) -> list[bytes]:
                return fixed

        tail = [sse(chunk("", i, finish_reason)) for i in range(len(prompts))]
        if include_usage:
            tail.append(sse({**common, "choices": [], "usage": usage}))
        return await self.stream(
            request,
            ctx,
            (),
            count,
            events,
            tail,
        )

    async def embeddings(
        self, request: web.Request, ctx: RequestSettings, raw_body: Any
    ) -> web.StreamResponse:
        body = require_object(raw_body)
        model = require_model(body)
        if "input" not in body:
            raise RequestError(
                "you must provide an input parameter", param="input", code="missing_input"
            )
        inputs = parse_inputs(body["input"], "input")
        dimensions = body.get("dimensions")
        if dimensions is None:
            dimensions = self.settings.embedding_dimensions
        elif not is_int(dimensions) or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
            raise RequestError(
                f"Invalid 'dimensions': expected an integer in 1..{MAX_EMBEDDING_DIMENSIONS}",
                param="dimensions",
                code="invalid_value",
            )
        encoding = body.get("encoding_format")
        if encoding is None:
            encoding = "float"
        if encoding not in ("float", "base64"):
            raise RequestError(
                "Invalid 'encoding_format': expected 'float' or 'base64'",
                param="encoding_format",
                code="invalid_value",
            )
        as_base64 = encoding == "base64"
        await pause(request, ctx.ttft)
        await non_stream_fault(request, ctx.fault, self.settings.stall_seconds)
        data = []
        for index, (_, identity) in enumerate(inputs):
            floats, b64 = embedding(identity, dimensions)
            data.append(
                {"object": "embedding", "index": index, "embedding": b64 if as_base64 else floats}
            )
        prompt_tokens = sum(tokens for tokens, _ in inputs)
        return json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )

    async def moderations(
        self, request: web.Request, ctx: RequestSettings, raw_body: Any
    ) -> web.Response:
        body = require_object(raw_body)
        model = body.get("model", DEFAULT_MODERATION_MODEL)
        if not isinstance(model, str) or not model:
            raise RequestError(
                "'model' must be a non-empty string", param="model", code="invalid_type"
            )
        if "input" not in body:
            raise RequestError(
                "you must provide an input parameter", param="input", code="missing_input"
            )
        groups = moderation_inputs(body["input"])
        delay = directives(text for group in groups for text in group).delay
        await pause(request, ctx.ttft + delay)
        await non_stream_fault(request, ctx.fault, self.settings.stall_seconds)
        return json_response(
            {
                "id": f"modr-{uuid.uuid4().hex}",
                "model": model,
                "results": [moderation_result(group) for group in groups],
            }
        )

    async def guard_webhook(
        self, request: web.Request, ctx: RequestSettings, raw_body: Any
    ) -> web.Response:
        body = require_object(raw_body)
        texts = body.get("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError(
                "'texts' must be an array of strings", param="texts", code="invalid_type"
            )
        await pause(request, ctx.ttft + directives(texts).delay)
        await non_stream_fault(request, ctx.fault, self.settings.stall_seconds)
        return json_response(webhook_reply(texts))

    async def list_models(
        self, _request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        names = [DEFAULT_MODEL, *(m for m in self.models if m != DEFAULT_MODEL)]
        data = [
            {"id": name, "object": "model", "created": self.created, "owned_by": "fake-llm"}
            for name in names
        ]
        return json_response({"object": "list", "data": data})

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API (anthropic.py): recorded like the others, with its own
        error shape, faults included (the `v1` wrapper answers in OpenAI's)."""
        body = await self.observe(request)
        try:
            ctx = request_settings(self.settings, request.headers)
            return await anthropic.messages(request, ctx, body, self.settings.stall_seconds)
        except RequestError as exc:
            return anthropic.error_response(anthropic.AnthropicError(exc.message))
        except (Aborted, ConnectionError):
            return web.Response()

    async def gemini_generate_content(self, request: web.Request) -> web.StreamResponse:
        """Google's Gemini API, and Vertex AI's (gemini.py): recorded like the others (with the
        credential it carried), with Google's error shape, faults included."""
        body = await self.observe(request)
        record = self.records[-1] if self.records.maxlen else None
        self.note_model(request.match_info["model"])
        try:
            ctx = request_settings(self.settings, request.headers)
            return await gemini.generate_content(
                request, ctx, body, self.settings.stall_seconds, record, self.issuer
            )
        except RequestError as exc:
            return gemini.error_response(gemini.GeminiError(exc.message))
        except (Aborted, ConnectionError):
            return web.Response()

    async def bedrock_converse(self, request: web.Request) -> web.StreamResponse:
        """AWS Bedrock's Converse and ConverseStream (bedrock.py): recorded like the others,
        signatures checked, with Bedrock's error shape, faults included."""
        body = await self.observe(request)
        try:
            return await bedrock.converse(request, body, self.settings, self.bedrock_cache)
        except (Aborted, ConnectionError):
            return web.Response()

    async def bedrock_invoke(self, request: web.Request) -> web.StreamResponse:
        """AWS Bedrock's InvokeModel for its embedding models (bedrock.py): recorded like the
        others, signatures checked, with Bedrock's error shape, faults included."""
        body = await self.observe(request)
        try:
            return await bedrock.invoke(request, body, self.settings)
        except (Aborted, ConnectionError):
            return web.Response()

    async def azure_deployment(self, request: web.Request) -> web.StreamResponse:
        """Azure OpenAI's deployment API (azure.py): its refusals in Azure's shapes, then the
        OpenAI endpoint the path names."""
        refused = azure.refusal(request, self.issuer)
        if refused is not None:
            await self.observe(request)
            return refused
        endpoint = {
            "chat/completions": self.chat_completions,
            "completions": self.completions,
            "embeddings": self.embeddings,
        }[request.match_info["operation"]]
        return await self.v1(endpoint)(request)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_records(self, _request: web.Request) -> web.Response:
        return json_response(list(self.records))

    async def clear_records(self, _request: web.Request) -> web.Response:
        cleared = len(self.records)
        self.records.clear()
        return json_response({"cleared": cleared})
