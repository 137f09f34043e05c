"""The upstream stage: the ext_proc filter inside a backend's (or a pool's) cluster, one stream
per attempt. It prepares the request for the backend Envoy picked: its credential and its name
for the model (routing.py). It settles nothing: the downstream stage owns the request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from . import protocol, providers, routing, wire
from .aws_signing import SIGNING_HEADERS, signed_headers
from .contract import BACKEND_METADATA, ENDPOINT_HEADER
from .errors import GatewayError, bad_request
from .wire.openai.request import CHAT

if TYPE_CHECKING:
    from .config import ResolvedTarget
    from .services import Services


class UpstreamStream:
    """The per-backend stage inside a cluster: credentials, model name and, for a backend of
    another API, the translated request, for this attempt."""

    __slots__ = (
        "content_type", "endpoint", "finished", "metadata", "rt", "sign", "target", "tokens",
        "translated",
    )  # fmt: skip

    def __init__(self, services: Services, metadata: Mapping[str, str]) -> None:
        self.rt = services.runtime
        self.tokens = services.backend_tokens
        self.metadata = metadata
        self.target: ResolvedTarget | None = None
        # A pooled Bedrock attempt: Envoy's signing is in the backend's own cluster, which a
        # pool's attempts do not pass, so this stage signs (aws_signing.py).
        self.sign = False
        self.content_type = "application/json"
        self.endpoint = CHAT.path  # the client's endpoint (ENDPOINT_HEADER)
        self.translated = False  # the attempt's backend gets the request in its own API
        # True once the request's last phase for this stage is answered: the headers when
        # the body stays as it is, else the body. No response phase is ever sent here.
        self.finished = False

    def close(self) -> None:
        """Nothing to settle: the downstream stage owns the request's accounting."""

    def failed(self) -> None:
        """Nothing to report: the downstream stage reports the request."""

    async def handle(self, req: protocol.ProcessingRequest) -> protocol.ProcessingResponse:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                headers = protocol.header_dict(req.request_headers.headers)
                backend = self.metadata.get(BACKEND_METADATA)
                pooled = backend is None
                if pooled:
                    backend = protocol.host_backend(req)
                target = routing.upstream_target(self.rt, backend, headers)
                self.target = target = routing.with_token(target, self.tokens)
                set_headers, remove = routing.upstream_header_mutation(
                    self.rt, target, headers, retriable=pooled
                )
                self.sign = pooled and target.signing_region is not None
                self.endpoint = endpoint = headers.get(ENDPOINT_HEADER, CHAT.path)
                # A bridged API's client served as it speaks (every backend of the model
                # speaks its API, routing.served_natively): the request goes as it is.
                native = wire.speaking(endpoint).bridge is not None
                translated = providers.translates(target.provider) and not native
                if target.model in self.rt.adapted:
                    # The model's backends differ in API or addressing: this attempt's path and
                    # headers are its backend's (it starts from the headers the last one left).
                    own, others = providers.request_headers(target.provider)
                    set_headers.update(own)
                    if native:
                        # (The client's options of its own API, Anthropic's betas, stay.)
                        strip = providers.provider(target.provider).strip_headers
                        others = [h for h in others if h not in strip]
                    remove.extend(others)
                    if not self.sign:
                        remove.extend(SIGNING_HEADERS)
                    self.content_type = headers.get("content-type", self.content_type)
                    if not translated:
                        set_headers[":path"] = providers.backend_path(target, endpoint, False)
                needs_body = translated or target.provider_model != target.model
                self.translated = translated
                self.finished = not needs_body
                if needs_body:
                    # The rewritten body has another length; Envoy only drops content-length
                    # itself when the body mode was BUFFERED from the start, not on override.
                    remove.append("content-length")
                return protocol.request_headers_response(
                    protocol.common(set_headers, remove),
                    mode_override=protocol.UPSTREAM_REWRITE_BODY if needs_body else None,
                )
            if kind == "request_body" and self.target is not None:
                self.finished = True
                target = self.target
                if not self.translated:
                    body = routing.rewrite_model(req.request_body.body, target.provider_model)
                    return protocol.request_body_response(protocol.common(body=body))
                # This attempt goes to a backend of another API: the request in its terms
                # (the downstream stage checked that every backend of the model can serve it).
                parsed = orjson.loads(req.request_body.body)
                if not isinstance(parsed, dict):
                    raise orjson.JSONDecodeError("not a JSON object", "", 0)
                body = providers.request_body(target, parsed, self.endpoint)
                path = providers.backend_path(target, self.endpoint, parsed.get("stream") is True)
                set_headers = {":path": path}
                if self.sign:
                    assert target.signing_region is not None
                    credentials = self.tokens.aws_credentials(target.backend)
                    set_headers.update(
                        signed_headers(
                            credentials,
                            target.signing_region,
                            target.host,
                            path,
                            body,
                            self.content_type,
                        )
                    )
                return protocol.request_body_response(protocol.common(set_headers, body=body))
        except GatewayError as err:
            # This stage does not know the client's API: the default's error shape.
            body = wire.DEFAULT.error_body(err)
            return protocol.immediate_response(err.status, body, details="aigw_upstream")
        except orjson.JSONDecodeError:
            bad = bad_request("We could not parse the JSON body of your request", "invalid_json")
            body = wire.DEFAULT.error_body(bad)
            return protocol.immediate_response(bad.status, body, details="aigw_upstream")
        return protocol.passthrough(kind)
