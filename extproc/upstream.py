"""The upstream stage: the ext_proc filter inside a backend's (or a pool's) cluster, one stream
per attempt. It prepares the request for the backend Envoy picked: its credential and its name
for the model (routing.py). It settles nothing: the downstream stage owns the request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from . import protocol, routing, wire
from .contract import BACKEND_METADATA
from .errors import GatewayError, bad_request

if TYPE_CHECKING:
    from .config import ResolvedTarget
    from .services import Services


class UpstreamStream:
    """The per-backend stage inside a cluster: credentials and model name for this attempt."""

    __slots__ = ("finished", "metadata", "rt", "target")

    def __init__(self, services: Services, metadata: Mapping[str, str]) -> None:
        self.rt = services.runtime
        self.metadata = metadata
        self.target: ResolvedTarget | None = None
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
                self.target = target = routing.upstream_target(self.rt, backend, headers)
                set_headers, remove = routing.upstream_header_mutation(
                    self.rt, target, headers, retriable=pooled
                )
                needs_body = target.provider_model != target.model
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
                body = routing.rewrite_model(req.request_body.body, self.target.provider_model)
                return protocol.request_body_response(protocol.common(body=body))
        except GatewayError as err:
            # This stage does not know the client's API: the default's error shape.
            body = wire.DEFAULT.error_body(err)
            return protocol.immediate_response(err.status, body, details="aigw_upstream")
        except orjson.JSONDecodeError:
            bad = bad_request("We could not parse the JSON body of your request", "invalid_json")
            body = wire.DEFAULT.error_body(bad)
            return protocol.immediate_response(bad.status, body, details="aigw_upstream")
        return protocol.passthrough(kind)
