"""The fake's aiohttp application (its routes) and a server for it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from .batches import BatchAPI
from .endpoints import FakeLLM
from .media import MediaAPI
from .responses import ResponsesAPI
from .settings import FakeLLMSettings, validate_settings

# The logger the fake had before it moved to devtools, so its log lines read as they did.
log = logging.getLogger("extproc.fake_llm")

# Long-context prompts and inline images easily exceed aiohttp's 1 MiB default.
_CLIENT_MAX_SIZE = 64 * 1024 * 1024

_STATE = web.AppKey("fake_llm", FakeLLM)


def create_app(settings: FakeLLMSettings) -> web.Application:
    """Build the fake's aiohttp application; raises ValueError for invalid settings."""
    validate_settings(settings)
    fake = FakeLLM(settings)
    app = web.Application(middlewares=[fake.record_unrouted], client_max_size=_CLIENT_MAX_SIZE)
    app[_STATE] = fake
    app.on_response_prepare.append(fake.stamp_instance)
    app.router.add_post("/v1/chat/completions", fake.v1(fake.chat_completions))
    app.router.add_post("/v1/completions", fake.v1(fake.completions))
    app.router.add_post("/v1/embeddings", fake.v1(fake.embeddings))
    app.router.add_post("/v1/moderations", fake.v1(fake.moderations))
    responses = ResponsesAPI(fake)  # OpenAI's Responses API, with the responses it stored
    app.router.add_post("/v1/responses", fake.v1(responses.create))
    app.router.add_post("/v1/responses/input_tokens", fake.v1(responses.input_tokens))
    app.router.add_get("/v1/responses/{response_id}", fake.v1(responses.retrieve))
    app.router.add_delete("/v1/responses/{response_id}", fake.v1(responses.delete))
    app.router.add_get("/v1/responses/{response_id}/input_items", fake.v1(responses.input_items))
    media = MediaAPI(fake)  # OpenAI's image and audio endpoints, and vLLM's rerank
    app.router.add_post("/v1/images/generations", fake.v1(media.images_generations))
    app.router.add_post("/v1/audio/speech", fake.v1(media.speech))
    app.router.add_post("/v1/audio/transcriptions", fake.v1(media.transcriptions))
    app.router.add_post("/v1/audio/translations", fake.v1(media.translations))
    app.router.add_post("/v1/rerank", fake.v1(media.rerank))
    batches = BatchAPI(fake, responses, media)  # OpenAI's Files and Batch APIs
    app.router.add_post("/v1/files", fake.v1(batches.upload))
    app.router.add_get("/v1/files", fake.v1(batches.list_files))
    app.router.add_get("/v1/files/{file_id}", fake.v1(batches.retrieve_file))
    app.router.add_delete("/v1/files/{file_id}", fake.v1(batches.delete_file))
    app.router.add_get("/v1/files/{file_id}/content", fake.v1(batches.file_content))
    app.router.add_post("/v1/batches", fake.v1(batches.create))
    app.router.add_get("/v1/batches", fake.v1(batches.list_batches))
    app.router.add_get("/v1/batches/{batch_id}", fake.v1(batches.retrieve))
    app.router.add_post("/v1/batches/{batch_id}/cancel", fake.v1(batches.cancel))
    app.router.add_post("/v1/messages", fake.anthropic_messages)
    # Gemini's `/v1beta/models/{model}:generateContent`, and Vertex AI's under
    # `/v1/projects/{p}/locations/{l}/publishers/google` (gemini.py checks the prefix).
    app.router.add_post("/{prefix:.+}/models/{model}:{method}", fake.gemini_generate_content)
    # Bedrock's model ids hold ':' and, as ARNs, '/' (percent-encoded): bedrock.py reads the
    # id from the raw path.
    app.router.add_post("/model/{model_id:.+}/converse", fake.bedrock_converse)
    app.router.add_post("/model/{model_id:.+}/converse-stream", fake.bedrock_converse)
    # InvokeModel, for the embedding models (bedrock.py).
    app.router.add_post("/model/{model_id:.+}/invoke", fake.bedrock_invoke)
    app.router.add_post(
        r"/openai/deployments/{deployment}/{operation:chat/completions|completions|embeddings}",
        fake.azure_deployment,
    )
    app.router.add_get("/_fake/identity/azure-msi", fake.issuer.azure_msi)
    app.router.add_post("/_fake/identity/google-token", fake.issuer.google_token)
    app.router.add_post("/_fake/guard-webhook", fake.v1(fake.guard_webhook))
    app.router.add_get("/v1/models", fake.v1(fake.list_models))
    app.router.add_get("/healthz", fake.healthz)
    app.router.add_get("/_fake/requests", fake.get_records)
    app.router.add_delete("/_fake/requests", fake.clear_records)
    return app


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return str(address)


async def serve(host: str, port: int, settings: FakeLLMSettings) -> None:
    """Serve the fake on host:port until cancelled."""
    app = create_app(settings)
    # Access logging would dominate per-request cost in benchmarks. handler_cancellation stops
    # work (pacing, stalls) for clients that have gone away, as real inference servers do.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        for address in runner.addresses:
            log.info("fake-llm %r listening on %s", settings.name, _format_address(address))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
