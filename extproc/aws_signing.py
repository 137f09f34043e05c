"""SigV4 for a Bedrock request the sidecar prepares in a failover pool: a pool's attempts go
through the pool's aggregate cluster, not the backend's own, where Envoy's aws_request_signing
filter signs every other Bedrock request. botocore signs, with the credentials of botocore's
standard chain that backend_tokens.py keeps fresh; nothing here hand-rolls SigV4."""

from __future__ import annotations

from typing import Any

from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]

SERVICE = "bedrock"
# What a signature adds to a request: an attempt that is not signed by the sidecar removes
# what an earlier one left (a retry starts from its headers).
SIGNING_HEADERS = ("x-amz-date", "x-amz-security-token", "x-amz-content-sha256")


def signed_headers(
    credentials: Any, region: str, host: str, path: str, body: bytes, content_type: str
) -> dict[str, str]:
    """The headers that sign a POST of `body` to `host` + `path` (its query included), as sent:
    Authorization, X-Amz-Date and, with temporary credentials, X-Amz-Security-Token. `host` is
    the Host Envoy sends (the backend URL's host: its clusters rewrite the host to it)."""
    request = AWSRequest(
        method="POST",
        url=f"https://{host}{path}",
        data=body,
        headers={"host": host, "content-type": content_type},
    )
    SigV4Auth(credentials, SERVICE, region).add_auth(request)
    return {
        name.lower(): str(value)
        for name, value in request.headers.items()
        if name.lower() in ("authorization", "x-amz-date", "x-amz-security-token")
    }
