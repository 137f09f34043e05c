"""The identity providers a backend's token comes from, faked for the tests of the real
credential code (backend_tokens.py): Azure App Service's managed identity endpoint (what
azure-identity's ManagedIdentityCredential reads from IDENTITY_ENDPOINT / IDENTITY_HEADER) and
Google's OAuth2 token endpoint (the `token_uri` of a service account key, which google-auth
posts a signed JWT assertion to). The tokens issued are the only bearer tokens the fake's Azure
and Gemini endpoints accept.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

import orjson
from aiohttp import web

from .wire import json_response

# What the fake's App Service identity endpoint wants in X-IDENTITY-HEADER.
IDENTITY_HEADER_SECRET = "fake-identity-header"
AZURE_RESOURCE = "https://cognitiveservices.azure.com"
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


class Issuer:
    """The tokens issued, and what each was issued for."""

    def __init__(self, lifetime_s: int = 3600) -> None:
        self.lifetime_s = lifetime_s
        self.issued: dict[str, str] = {}  # token -> "azure" | "google"

    def issue(self, kind: str) -> str:
        token = f"fake-{kind}-{secrets.token_urlsafe(16)}"
        self.issued[token] = kind
        return token

    def accepts(self, authorization: str | None, kind: str) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        return self.issued.get(authorization.removeprefix("Bearer ")) == kind

    async def azure_msi(self, request: web.Request) -> web.Response:
        """App Service's managed identity protocol (api-version 2019-08-01)."""
        if request.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER_SECRET:
            return json_response({"error": "invalid X-IDENTITY-HEADER"}, status=401)
        if request.query.get("api-version") != "2019-08-01":
            return json_response({"error": "unsupported api-version"}, status=400)
        resource = request.query.get("resource", "").rstrip("/")
        if resource != AZURE_RESOURCE:
            return json_response({"error": f"unknown resource {resource!r}"}, status=400)
        return json_response(
            {
                "access_token": self.issue("azure"),
                "expires_on": str(int(time.time()) + self.lifetime_s),
                "resource": AZURE_RESOURCE,
                "token_type": "Bearer",
                "client_id": "00000000-0000-0000-0000-000000000000",
            }
        )

    async def google_token(self, request: web.Request) -> web.Response:
        """Google's token endpoint for a service account: a JWT assertion whose claims ask for
        the cloud-platform scope from Google's token endpoint. (The signature is not checked: the
        fake does not know the key's public half.)"""
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            return json_response({"error": "unsupported_grant_type"}, status=400)
        claims = _jwt_claims(str(form.get("assertion", "")))
        if claims is None or GOOGLE_SCOPE not in str(claims.get("scope", "")).split():
            return json_response({"error": "invalid_scope"}, status=400)
        # google-auth names Google's own token endpoint as the audience, whatever token_uri.
        if claims.get("aud") not in (GOOGLE_TOKEN_URI, str(request.url)):
            return json_response({"error": "invalid_grant", "error_description": "aud"}, 400)
        return json_response(
            {
                "access_token": self.issue("google"),
                "expires_in": self.lifetime_s,
                "token_type": "Bearer",
            }
        )


def _jwt_claims(assertion: str) -> dict[str, Any] | None:
    parts = assertion.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = orjson.loads(payload)
    except (ValueError, orjson.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None
