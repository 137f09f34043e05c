"""Azure OpenAI's deployment API, faked: `/openai/deployments/{deployment}/{operation}` with a
required `api-version`, the `api-key` header or an Entra ID bearer token (one the fake's
identity endpoint issued), OpenAI's bodies (served by the fake's OpenAI endpoints), and Azure's
own error shapes: the gateway's 401 (`{"statusCode", "message"}`) and the content filter's 400
(`x-fake-azure-filter: prompt` asks for it). Reference: Azure OpenAI's data-plane inference API
and its content filtering documentation.
"""

from __future__ import annotations

import re

from aiohttp import web

from .identity import Issuer
from .wire import json_response

API_KEY_HEADER = "api-key"
FILTER_HEADER = "x-fake-azure-filter"
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")


def refusal(request: web.Request, issuer: Issuer) -> web.Response | None:
    """Azure's answer to a request it would refuse before the model sees it; None: served."""
    version = request.query.get("api-version")
    if version is None or not _VERSION.match(version):
        return json_response(
            {
                "error": {
                    "code": "404",
                    "message": "Resource not found",
                }
            },
            status=404,
        )
    key = request.headers.get(API_KEY_HEADER)
    bearer = request.headers.get("Authorization")
    if not key and not issuer.accepts(bearer, "azure"):
        return json_response(
            {
                "statusCode": 401,
                "message": "Unauthorized. Access token is missing, invalid, audience is "
                "incorrect (https://cognitiveservices.azure.com), or have expired.",
            },
            status=401,
        )
    if request.headers.get(FILTER_HEADER) == "prompt":
        return json_response(
            {
                "error": {
                    "message": "The response was filtered due to the prompt triggering Azure "
                    "OpenAI's content management policy. Please modify your prompt and retry.",
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": {
                            "hate": {"filtered": False, "severity": "safe"},
                            "self_harm": {"filtered": False, "severity": "safe"},
                            "sexual": {"filtered": False, "severity": "safe"},
                            "violence": {"filtered": True, "severity": "medium"},
                        },
                    },
                }
            },
            status=400,
        )
    return None
