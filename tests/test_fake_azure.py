"""The fake speaks Azure OpenAI's deployment API as the official client (the openai SDK's
AzureOpenAI) calls it: the deployment and api-version in the path, `api-key` or an Entra ID
token (one the fake's identity endpoint issued), Azure's own error shapes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from extproc.devtools.fake_llm import FakeLLMSettings
from extproc.devtools.fake_llm.identity import IDENTITY_HEADER_SECRET
from extproc.providers import azure as translation

from .test_fake_llm import _running

API_VERSION = "2024-10-21"


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _running(FakeLLMSettings(name="fake-azure", response_tokens=5)) as bound:
        yield bound


def azure(port: int, **auth: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=f"http://127.0.0.1:{port}",
        api_version=API_VERSION,
        max_retries=0,
        **auth,  # type: ignore[arg-type]
    )


def records(port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_fake/requests") as resp:
        return json.load(resp)


def entra_token(port: int) -> str:
    """A token from the fake's App Service identity endpoint, as azure-identity gets one."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/_fake/identity/azure-msi?api-version=2019-08-01"
        "&resource=https://cognitiveservices.azure.com",
        headers={"X-IDENTITY-HEADER": IDENTITY_HEADER_SECRET},
    )
    with urllib.request.urlopen(request) as resp:
        return str(json.load(resp)["access_token"])


def test_a_deployment_through_the_sdk(port: int) -> None:
    answer = azure(port, api_key="azure-key").chat.completions.create(
        model="my-deployment", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content and answer.usage is not None
    sent = records(port)[-1]
    assert sent["path"] == "/openai/deployments/my-deployment/chat/completions"
    assert sent["headers"]["api-key"] == "azure-key"


def test_embeddings_and_a_stream_through_the_sdk(port: int) -> None:
    client = azure(port, api_key="azure-key")
    assert len(client.embeddings.create(model="emb", input=["a", "b"]).data) == 2
    chunks = list(
        client.chat.completions.create(
            model="my-deployment", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_an_entra_id_token_it_issued_is_taken_and_no_other(port: int) -> None:
    token = entra_token(port)
    client = azure(port, azure_ad_token=token)
    client.chat.completions.create(model="d", messages=[{"role": "user", "content": "hi"}])
    assert records(port)[-1]["headers"]["authorization"] == f"Bearer {token}"
    with pytest.raises(openai.AuthenticationError) as caught:
        azure(port, azure_ad_token="not-issued").chat.completions.create(
            model="d", messages=[{"role": "user", "content": "hi"}]
        )
    # Azure's gateway shape, not OpenAI's: the gateway makes it OpenAI's (azure.error).
    assert "statusCode" in caught.value.response.json()
    mapped = translation.error(401, caught.value.response.content)
    assert mapped is not None and mapped.type == "authentication_error"
    assert "Access token is missing" in mapped.message


def test_a_request_without_api_version_is_not_found(port: int) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/openai/deployments/d/chat/completions",
        data=b'{"messages": [{"role": "user", "content": "hi"}]}',
        headers={"api-key": "k", "content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 404


def test_the_content_filters_refusal_becomes_a_clear_openai_error(port: int) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        azure(port, api_key="k").chat.completions.create(
            model="d",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-azure-filter": "prompt"},
        )
    mapped = translation.error(400, caught.value.response.content)
    assert mapped is not None
    assert (mapped.status, mapped.type, mapped.code, mapped.param) == (
        400,
        "invalid_request_error",
        "content_filter",
        "prompt",
    )
    assert "(violence: medium)" in mapped.message


def test_an_error_already_in_openais_shape_is_left_as_it_is() -> None:
    body = b'{"error": {"message": "bad", "type": "invalid_request_error", "param": null}}'
    assert translation.error(400, body) is None
    not_found = translation.error(404, b'{"error": {"code": "DeploymentNotFound", "message": "x"}}')
    assert not_found is not None and not_found.code == "DeploymentNotFound"
    assert not_found.status == 404 and not_found.type == "invalid_request_error"
    garbage = translation.error(502, b"<html>bad gateway</html>")
    assert garbage is not None and garbage.type == "server_error" and garbage.status == 502
