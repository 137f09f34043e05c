"""An OpenAI-compatible fake upstream LLM for end-to-end tests, the quickstart and benchmarks.

The fake answers ``/v1/chat/completions`` (tool calls included: `chat_tools`),
``/v1/completions``, ``/v1/embeddings``, ``/v1/models``, OpenAI's Responses API
(`responses`), images, speech, transcriptions and rerank (`media`), and the APIs of other
providers (`anthropic`, `bedrock`, `gemini`, `azure`) with deterministic content in each
API's exact wire format (including streaming), and can inject latency and faults so the
gateway's retry, timeout and failover paths can be exercised without a real model. It also
plays safety models and a guard webhook (`safety`), for testing the gateway's external guards.

Per-request knobs are request headers, so one running instance can serve many test cases:

- ``x-fake-fault``: a fault (`faults`), or ``none`` (suppresses a fault configured on the
  instance).
- ``x-fake-ttft-ms``, ``x-fake-tokens-per-second``, ``x-fake-response-tokens``.
- ``x-fake-response-text`` (with ``x-fake-chunk-chars``, default 4): a chat answer with this
  text, streamed that many characters per event.
- ``x-fake-no-usage: 1``: a backend that reports no usage (its streams ignore
  ``stream_options.include_usage``, its JSON answers have no ``usage``).
- ``x-fake-reasoning-tokens: N``: of the completion, N reported as reasoning tokens.
- ``x-fake-linger-ms: N``: a chat stream that stays open N ms after ``[DONE]`` before it
  ends.
- ``x-fake-parallel-tools: N``: a forced tool choice answered with N calls.
- ``x-fake-response-failed: server_error|rate_limit_exceeded[:N]``: a Responses stream that
  fails after N events.

Test helpers: ``GET /_fake/requests`` lists the recorded ``/v1/*`` and guard webhook requests
and ``DELETE /_fake/requests`` clears them.

`extproc fake-llm` runs it (`cli`); `extproc up` starts it when its config file has a
``fake_llm:`` section (`section`).
"""

from .app import create_app, serve
from .cli import add_arguments, main_from_args
from .settings import FakeLLMSettings

__all__ = ["FakeLLMSettings", "add_arguments", "create_app", "main_from_args", "serve"]
