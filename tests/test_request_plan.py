"""request_plan.plan: what Envoy is told about an admitted request, without protobuf or Envoy."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.config import ResolvedTarget, SidecarSettings
from extproc.contract import (
    METADATA_NAMESPACE,
    POOL_HEADER,
    RATE_LIMIT_KEY,
    ROUTE_HEADER,
    TARGET_HEADER,
    Handover,
)
from extproc.identity import Identity
from extproc.request_plan import Admitted, plan
from extproc.settlement import AnswerPath
from extproc.wire.openai import CHAT, OPENAI

TARGET = ResolvedTarget("gpt-4o", "openai", "gpt-4o-2024-08-06", 1, "authorization", "Bearer k")


def admitted(stream: bool = False, include_usage: bool = False, **fields: Any) -> Admitted:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    request = OPENAI.parse(CHAT, orjson.dumps(body))
    return Admitted(
        who=Identity("team-a"),
        request=request,
        wire=OPENAI,
        prompt_tokens=9,
        max_output=100,
        started_at=1.5,
        **fields,
    )


def sidecar(**fields: Any) -> SidecarSettings:
    return SidecarSettings.model_validate(fields)


def test_one_backend_gets_its_credential_and_model_name_and_the_request_is_released() -> None:
    a = admitted(reservation="r1", limits=("tpm",), rate_headers={"x-ratelimit-limit-tokens": "9"})
    p = plan(a, TARGET, sidecar())
    assert p.release and not p.observe and p.path is AnswerPath.LOGGED
    assert p.set_headers[ROUTE_HEADER] == "gpt-4o"
    assert p.set_headers[TARGET_HEADER] == "openai"
    assert p.set_headers["authorization"] == "Bearer k"
    assert p.body is not None and orjson.loads(p.body)["model"] == "gpt-4o-2024-08-06"
    assert p.set_headers["content-length"] == str(len(p.body))
    assert a.request.body["model"] == "gpt-4o"  # the admitted request is left as it was
    data = p.metadata[METADATA_NAMESPACE]
    assert data[RATE_LIMIT_KEY] == {"x-ratelimit-limit-tokens": "9"}
    handover = Handover.from_metadata(data)
    assert handover == p.handover
    assert (handover.account, handover.reservation, handover.limits) == (True, "r1", ("tpm",))
    assert (handover.backend, handover.provider_model) == ("openai", "gpt-4o-2024-08-06")
    assert (handover.prompt_tokens, handover.output_estimate, handover.started_at) == (9, 100, 1.5)


def test_a_pooled_model_is_kept_and_its_body_untouched() -> None:
    p = plan(admitted(), None, sidecar())
    assert not p.release and p.path is AnswerPath.NO_ANSWER
    assert p.body is None and TARGET_HEADER not in p.set_headers
    # Only what a finisher that is not this stage needs is left out.
    assert p.handover.reservation == "" and p.handover.started_at != 1.5


@pytest.mark.parametrize(
    ("include_usage", "stream_path", "observe", "strip"),
    [
        (True, "auto", True, False),  # the client asked for usage: observed
        (False, "auto", False, True),  # inline, usage asked for and cut again
        (False, "observe", True, False),
        (True, "inline", False, False),
    ],
)
def test_a_stream_is_observed_or_kept_inline(
    include_usage: bool, stream_path: str, observe: bool, strip: bool
) -> None:
    a = admitted(stream=True, include_usage=include_usage)
    p = plan(a, None, sidecar(stream_path=stream_path))
    assert (p.observe, p.strip_usage, p.handover.observe) == (observe, strip, observe)
    if strip:
        assert p.body is not None
        assert orjson.loads(p.body)["stream_options"] == {"include_usage": True}


def test_response_guards_keep_the_answer_with_the_stage() -> None:
    p = plan(admitted(stream=True, include_usage=True, response_guards=True), TARGET, sidecar())
    assert not p.observe and not p.release
    p = plan(admitted(response_guards=True), TARGET, sidecar())
    assert not p.release


def test_json_path_inline_keeps_a_json_answer() -> None:
    assert not plan(admitted(), TARGET, sidecar(json_path="inline")).release


def test_a_quota_failover_pins_the_next_pool() -> None:
    p = plan(admitted(pool=1), None, sidecar())
    assert p.set_headers[POOL_HEADER] == "1"
    assert p.metadata[METADATA_NAMESPACE]["failover"] == "quota"
    assert p.handover.pool == 1


def test_a_rewritten_body_is_sent() -> None:
    a = admitted(body_changed=True)
    p = plan(a, None, sidecar())
    assert p.body == orjson.dumps(a.request.body)


ANTHROPIC = ResolvedTarget(
    "gpt-4o", "claude-api", "claude-sonnet-4-5", 1, "x-api-key", "sk-ant", "anthropic", 77
)


@pytest.mark.parametrize(("stream", "include_usage"), [(False, False), (True, False), (True, True)])
def test_a_translated_request_goes_in_its_providers_terms_and_its_answer_passes_here(
    stream: bool, include_usage: bool
) -> None:
    p = plan(admitted(stream=stream, include_usage=include_usage), ANTHROPIC, sidecar())
    assert not p.release and not p.observe and p.path is AnswerPath.NO_ANSWER
    assert p.body is not None
    body = orjson.loads(p.body)
    assert body["model"] == "claude-sonnet-4-5" and body["max_tokens"] == 77
    assert "stream_options" not in body  # Anthropic reports a stream's usage unasked
    assert p.set_headers["x-api-key"] == "sk-ant"
    assert p.set_headers["content-length"] == str(len(p.body))
    # Its route leaves the path to the sidecar (Anthropic's, under the backend URL's path).
    assert p.set_headers[":path"] == "/v1/messages"
    # The relay cuts the usage chunk the client did not ask for.
    assert p.strip_usage is (stream and not include_usage)


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_whose_backends_speak_several_apis_is_never_released(stream: bool) -> None:
    """Envoy chooses the backend (a pool, a split): the upstream stage translates each attempt
    for its backend; the answer passes here, whichever API it is in."""
    a = admitted(stream=stream, include_usage=True)
    p = plan(a, None, sidecar(), adapted=True)
    assert not p.release and not p.observe and p.path is AnswerPath.NO_ANSWER
    assert ":path" not in p.set_headers  # the upstream stage sets each attempt's
    assert p.body is None  # the OpenAI request, for the OpenAI backends among them
    # An OpenAI backend pinned by a quota failover in such a model: the sidecar sets its path.
    openai = ResolvedTarget("gpt-4o", "openai", "gpt-4o", 1, "authorization", None, "openai")
    p = plan(a, openai, sidecar(), adapted=True)
    assert not p.release and p.set_headers[":path"] == "/v1/chat/completions"


@pytest.mark.parametrize(("version", "asks"), [("2024-06-01", False), ("2024-10-21", True)])
def test_an_azure_deployment_is_asked_for_a_streams_usage_where_its_version_takes_it(
    version: str, asks: bool
) -> None:
    """Azure added stream_options in 2024-09-01: an earlier version would refuse the stream."""
    from extproc.config import build_runtime, parse_config

    rt = build_runtime(
        parse_config(
            {
                "teams": {"t": {"keys": [{"sha256": "0" * 64}]}},
                "backends": {
                    "azure": {
                        "url": "https://r.openai.azure.com/openai",
                        "type": "azure",
                        "api_version": version,
                    }
                },
                "models": {"gpt-4o": {"targets": [{"backend": "azure", "model": "my-deployment"}]}},
            }
        )
    )
    azure = rt.targets[("gpt-4o", "azure")]
    p = plan(
        admitted(stream=True), azure, sidecar(), "gpt-4o" in rt.adapted,
        "gpt-4o" not in rt.unasked_usage,
    )  # fmt: skip
    assert p.set_headers[":path"] == (
        f"/openai/deployments/my-deployment/chat/completions?api-version={version}"
    )
    assert p.body is not None
    assert ("stream_options" in orjson.loads(p.body)) is asks and p.strip_usage is asks


def test_a_pool_with_an_old_azure_deployment_asks_no_streams_usage() -> None:
    """Envoy may send the request to an Azure deployment that refuses stream_options."""
    p = plan(admitted(stream=True), None, sidecar(), adapted=True, asks_usage=False)
    assert p.body is None and not p.strip_usage
