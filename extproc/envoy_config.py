"""Rendering Envoy's configuration from ours, with envoy-data-plane's typed messages.

What Envoy does is decided here: the listener, one route per model (a cluster, or
weighted_clusters for a canary), one cluster per backend with the upstream ext_proc stage in
its filter chain, the sidecar's cluster with gRPC health checks, access logs and local-reply
bodies in OpenAI's error shape. No secret is ever written: credentials are added per request by
the sidecar, so the rendered file is safe to keep.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import urlsplit

import betterproto2
import yaml
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    ExtensionFilter,
    MetadataFilter,
    OrFilter,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCustomClusterType,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
    ClusterTransportSocketMatch,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation as HeaderMutationRule,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutationRemoveOnMatch,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpUri,
    Metadata,
    Pipe,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RetryPolicy,
    RetryPolicyRetryBackOff,
    RetryPolicyRetryPriority,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    RouteMatchConnectMatcher,
    VirtualHost,
    WeightedCluster,
    WeightedClusterClusterWeight,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.clusters.aggregate.v3 import (
    ClusterConfig as AggregateClusterConfig,
)
from envoy_data_plane.envoy.extensions.common.matching.v3 import ExtensionWithMatcher
from envoy_data_plane.envoy.extensions.content_parsers.json.v3 import (
    JsonContentParser,
    JsonContentParserRuleConfig,
)
from envoy_data_plane.envoy.extensions.filters.http.aws_request_signing.v3 import (
    AwsRequestSigning,
)
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer
from envoy_data_plane.envoy.extensions.filters.http.composite.v3 import (
    Composite,
    ExecuteFilterAction,
)
from envoy_data_plane.envoy.extensions.filters.http.credential_injector.v3 import (
    CredentialInjector,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import (
    HeaderMutation,
    HeaderMutationPerRoute,
    Mutations,
)
from envoy_data_plane.envoy.extensions.filters.http.json_to_metadata.v3 import (
    JsonToMetadata,
    JsonToMetadataKeyValuePair,
    JsonToMetadataMatchRules,
    JsonToMetadataRule,
    JsonToMetadataSelector,
    JsonToMetadataValueType,
)
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwksAsyncFetch,
    JwtAuthentication,
    JwtHeader,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.http.sse_to_metadata.v3 import (
    SseToMetadata,
    SseToMetadataProcessingRules,
)
from envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3 import UpstreamCodec
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerTracing,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.http.injected_credentials.generic.v3 import Generic
from envoy_data_plane.envoy.extensions.matching.common_inputs.network.v3 import (
    DynamicMetadataInput,
    DynamicMetadataInputPathSegment,
)
from envoy_data_plane.envoy.extensions.matching.input_matchers.metadata.v3 import (
    Metadata as MetadataInputMatcher,
)
from envoy_data_plane.envoy.extensions.retry.priority.previous_priorities.v3 import (
    PreviousPrioritiesConfig,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    GenericSecret,
    SdsSecretConfig,
    Secret,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    HttpRequestHeaderMatchInput,
    ListMatcher,
    MetadataMatcher,
    MetadataMatcherPathSegment,
    OrMatcher,
    RegexMatcher,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, Percent, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyMsg
from envoy_data_plane.google.protobuf import Empty, Struct, Value
from envoy_data_plane.xds.core.v3 import TypedExtensionConfig as XdsExtension
from envoy_data_plane.xds.type.matcher.v3 import (
    Matcher,
    MatcherMatcherList,
    MatcherMatcherListFieldMatcher,
    MatcherMatcherListPredicate,
    MatcherMatcherListPredicateSinglePredicate,
    MatcherOnMatch,
)
from envoy_data_plane.xds.type.matcher.v3 import RegexMatcher as XdsRegexMatcher
from envoy_data_plane.xds.type.matcher.v3 import RegexMatcherGoogleRe2 as XdsRegexMatcherGoogleRe2
from envoy_data_plane.xds.type.matcher.v3 import StringMatcher as XdsStringMatcher

from . import errors
from .config import (
    Backend,
    ClaimRule,
    Config,
    Model,
    Target,
    parse_address,
    pooled,
    pools,
    split,
)
from .contract import (
    ACCOUNT_KEY,
    BACKEND_METADATA,
    CLUSTER_ATTRIBUTE,
    CODE_DETAILS_ATTRIBUTE,
    HOST_ATTRIBUTE,
    INTERNAL_HEADER_PREFIX,
    JWT_NAMESPACE,
    METADATA_NAMESPACE,
    NATIVE_ROUTE_PREFIX,
    OBSERVE_KEY,
    OBSERVE_STAGE,
    OWN_RESPONSE_HEADERS,
    POOL_HEADER,
    RATE_LIMIT_HEADERS,
    RATE_LIMIT_KEY,
    REQUEST_NAMESPACE,
    RESPONSE_HEADER_KEYS,
    ROUTE_HEADER,
    STAGE_METADATA,
    TARGET_HEADER,
    TEAM_HEADER,
    UPSTREAM_STAGE,
    USAGE_KEYS,
    cluster_name,
    jwt_failure_key,
    native_route_name,
    pool_cluster_name,
    split_cluster_name,
)
from .native import NativeRoute, native_routes
from .providers.registry import provider, request_headers, translates
from .usage import SOURCE_PROVIDER
from .wire.anthropic import MESSAGES as ANTHROPIC_MESSAGES
from .wire.openai.answer import error_body, error_object

SIDECAR_CLUSTER = "extproc_sidecar"
FAILOVER_BACKOFF_S = 0.001
# The gateway's own request headers: a backend reached without an upstream stage must not see
# them either (the upstream stage removes them on the other routes).
INTERNAL_REQUEST_HEADERS = [ROUTE_HEADER, POOL_HEADER, TEAM_HEADER, TARGET_HEADER]
OTLP_CLUSTER = "extproc_otlp"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
OBSERVER_FILTER = "extproc.stream_observer"
REQUEST_BUFFER_FILTER = "extproc.request_buffer"
REQUEST_HEADERS_FILTER = "extproc.request_headers"
REQUEST_RECEIVE_TIMEOUT_S = 60
REQUEST_HEADERS_TIMEOUT_S = 10
RESPONSE_HEADERS_FILTER = "extproc.response_headers"
USAGE_FILTER = "extproc.usage"
STREAM_USAGE_FILTER = "extproc.stream_usage"
JWT_FILTER = JWT_NAMESPACE  # jwt_authn writes its metadata under its own name
REQUEST_FACTS_FILTER = "extproc.request_facts"
CREDENTIAL_FILTER = "envoy.filters.http.credential_injector"
ACCESS_LOG_NAME = "extproc"
JSON_CONTENT_TYPE = r"(?i)application/json\s*(;.*)?"
# Envoy sends the sidecar its access log entries in batches: this often, or this many bytes.
# Small batches: a batch is serialized and read in one go, and 50 ms batches showed as +1 ms
# on the p99 latency of requests in flight meanwhile (10 ms: ~100 small messages a second).
ACCESS_LOG_FLUSH_S = 0.01
ACCESS_LOG_BUFFER_BYTES = 64 * 1024
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"
DEFAULT_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# The downstream stage: headers and buffered bodies both ways. Streams switch their response
# body to STREAMED per request (mode_override), so nothing is buffered that need not be.
DOWNSTREAM_MODE = ProcessingMode(
    request_header_mode=ProcessingModeHeaderSendMode.SEND,
    request_body_mode=ProcessingModeBodySendMode.BUFFERED,
    request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
    response_header_mode=ProcessingModeHeaderSendMode.SEND,
    response_body_mode=ProcessingModeBodySendMode.BUFFERED,
    response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
)
# The upstream stage sees request headers only, and asks for the body only when it must
# rewrite the model name (mode_override), so a backend that keeps the name costs one message.
UPSTREAM_MODE = ProcessingMode(
    request_header_mode=ProcessingModeHeaderSendMode.SEND,
    request_body_mode=ProcessingModeBodySendMode.NONE,
    request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
    response_header_mode=ProcessingModeHeaderSendMode.SKIP,
    response_body_mode=ProcessingModeBodySendMode.NONE,
    response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
)

# The observer follows a copy of a stream's response and is never waited for
# (observability_mode). It sees the response headers before the downstream stage does (the
# response runs the filters in reverse order), so it decides from them itself.
OBSERVER_MODE = ProcessingMode(
    request_header_mode=ProcessingModeHeaderSendMode.SKIP,
    request_body_mode=ProcessingModeBodySendMode.NONE,
    request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
    response_header_mode=ProcessingModeHeaderSendMode.SEND,
    response_body_mode=ProcessingModeBodySendMode.STREAMED,
    response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
)

ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_CLUSTER%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    # A native route's name holds the team and model, which no sidecar put in the metadata.
    "route": "%ROUTE_NAME%",
    "team": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:team)%",
    "model": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:model)%",
    "backend": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:backend)%",
    "prompt_tokens": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:prompt_tokens)%",
    "completion_tokens": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:completion_tokens)%",
    "total_tokens": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:total_tokens)%",
    "token_source": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:token_source)%",
    # Streams only: time to first token, chunks, gaps between them, output tokens per second.
    **{
        key: f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%"
        for key in ("ttft_ms", "chunks", "max_gap_ms", "mean_gap_ms", "output_tokens_per_s")
    },
}


def _duration(seconds: float) -> dt.timedelta:
    return dt.timedelta(seconds=seconds)


def _any(msg: betterproto2.Message) -> AnyMsg:
    return AnyMsg.pack(msg)


def _socket(address: str) -> Address:
    host, port = parse_address(address)
    if port is None:
        return Address(pipe=Pipe(path=host.removeprefix("unix:")))
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def sidecar_grpc_service(cfg: Config, metadata: dict[str, str] | None = None) -> GrpcService:
    return GrpcService(
        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SIDECAR_CLUSTER),
        timeout=_duration(cfg.sidecar.message_timeout_ms / 1000),
        initial_metadata=[HeaderValue(key=k, value=v) for k, v in (metadata or {}).items()],
    )


def downstream_ext_proc(cfg: Config) -> ExternalProcessor:
    return ExternalProcessor(
        grpc_service=sidecar_grpc_service(cfg),
        failure_mode_allow=False,
        processing_mode=DOWNSTREAM_MODE,
        allow_mode_override=True,
        message_timeout=_duration(cfg.sidecar.message_timeout_ms / 1000),
        # Which backend answered, and whether it did (an answer of Envoy's or of the upstream
        # stage is never a provider's to translate).
        response_attributes=[CLUSTER_ATTRIBUTE, HOST_ATTRIBUTE, CODE_DETAILS_ATTRIBUTE],
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[METADATA_NAMESPACE]),
            # The verified claims of a JWT (jwt_filter): who is calling.
            forwarding_namespaces=(
                MetadataOptionsMetadataNamespaces(untyped=[JWT_NAMESPACE])
                if cfg.identities.jwt
                else None
            ),
        ),
        status_on_error=_status(cfg.sidecar.failure_status),
    )


def upstream_ext_proc(cfg: Config, backend: str | None) -> ExternalProcessor:
    """The upstream stage of one backend's cluster (the backend in its gRPC metadata), or of a
    model's pooled cluster (each attempt's backend read from the chosen host's metadata)."""
    metadata = {STAGE_METADATA: UPSTREAM_STAGE}
    if backend is not None:
        metadata[BACKEND_METADATA] = backend
    return ExternalProcessor(
        grpc_service=sidecar_grpc_service(cfg, metadata),
        failure_mode_allow=False,
        processing_mode=UPSTREAM_MODE,
        allow_mode_override=True,
        message_timeout=_duration(cfg.sidecar.message_timeout_ms / 1000),
        status_on_error=_status(cfg.sidecar.failure_status),
        request_attributes=[] if backend is not None else [HOST_ATTRIBUTE],
    )


def observer_ext_proc(cfg: Config) -> ExternalProcessor:
    return ExternalProcessor(
        grpc_service=sidecar_grpc_service(cfg, {STAGE_METADATA: OBSERVE_STAGE}),
        # Observation must never fail a request: a lost observer costs accounting precision
        # (the reservation is then charged at its estimate), not the client's answer.
        failure_mode_allow=True,
        observability_mode=True,
        processing_mode=OBSERVER_MODE,
        # Which backend answered, for the stream's metrics and audit record.
        response_attributes=[CLUSTER_ATTRIBUTE, HOST_ATTRIBUTE],
        metadata_options=MetadataOptions(
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[METADATA_NAMESPACE])
        ),
    )


def observer_http_filter(cfg: Config) -> HttpFilter:
    """The stream observer, instantiated only for requests whose dynamic metadata says
    `observe: true` (set by the downstream stage): a composite filter matching on it, so no
    route needs to know about it and other requests pay nothing."""
    return _instantiated_when(
        OBSERVER_FILTER,
        "observe",
        DynamicMetadataInput(
            filter=METADATA_NAMESPACE, path=[DynamicMetadataInputPathSegment(key=OBSERVE_KEY)]
        ),
        XdsExtension(
            name="is_true",
            typed_config=_any(MetadataInputMatcher(value=ValueMatcher(bool_match=True))),
        ),
        observer_ext_proc(cfg),
    )


def _instantiated_when(
    name: str,
    input_name: str,
    match_input: betterproto2.Message,
    custom_match: XdsExtension | None,
    ext_proc: ExternalProcessor,
    value_match: XdsStringMatcher | None = None,
) -> HttpFilter:
    """An ext_proc filter that Envoy creates for a request only when `match_input` matches
    (a composite filter): a request it was not created for passes it untouched both ways."""
    matcher = Matcher(
        matcher_list=MatcherMatcherList(
            matchers=[
                MatcherMatcherListFieldMatcher(
                    predicate=MatcherMatcherListPredicate(
                        single_predicate=MatcherMatcherListPredicateSinglePredicate(
                            input=XdsExtension(name=input_name, typed_config=_any(match_input)),
                            custom_match=custom_match,
                            value_match=value_match,
                        )
                    ),
                    on_match=MatcherOnMatch(
                        action=XdsExtension(
                            name=input_name,
                            typed_config=_any(
                                ExecuteFilterAction(
                                    typed_config=TypedExtensionConfig(
                                        name=EXT_PROC_FILTER, typed_config=_any(ext_proc)
                                    )
                                )
                            ),
                        )
                    ),
                )
            ]
        )
    )
    return HttpFilter(
        name=name,
        typed_config=_any(
            ExtensionWithMatcher(
                extension_config=TypedExtensionConfig(
                    name="envoy.filters.http.composite", typed_config=_any(Composite())
                ),
                xds_matcher=matcher,
            )
        ),
    )


def response_headers_filter() -> HttpFilter:
    """The gateway's headers on every answer, rendered from what the sidecar put in the
    request's metadata: the answer itself need not pass the sidecar for them. Runs before the
    downstream stage on the way back, so what that stage adds (inline answers) stays."""
    overwrite = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
    rendered = {h: f"{METADATA_NAMESPACE}:{key}" for h, key in RESPONSE_HEADER_KEYS.items()}
    rendered |= {h: f"{METADATA_NAMESPACE}:{RATE_LIMIT_KEY}:{h}" for h in RATE_LIMIT_HEADERS}
    mutations = [HeaderMutationRule(remove=name) for name in OWN_RESPONSE_HEADERS]
    # A key the request's metadata lacks renders empty, and Envoy adds no empty header.
    mutations += [
        HeaderMutationRule(
            append=HeaderValueOption(
                header=HeaderValue(key=name, value=f"%DYNAMIC_METADATA({path})%"),
                append_action=overwrite,
            )
        )
        for name, path in rendered.items()
    ]
    return HttpFilter(
        name=RESPONSE_HEADERS_FILTER,
        typed_config=_any(HeaderMutation(mutations=Mutations(response_mutations=mutations))),
    )


def _usage_rules() -> list[JsonToMetadataRule]:
    """Where an answer's (or a stream event's) `usage` goes in the request's metadata: the keys
    the access log's reader takes the counts from (access_log._usage)."""

    def rule(path: list[str], key: str, value: str | None = None) -> JsonToMetadataRule:
        return JsonToMetadataRule(
            selectors=[JsonToMetadataSelector(key=k) for k in path],
            on_present=JsonToMetadataKeyValuePair(
                metadata_namespace=METADATA_NAMESPACE,
                key=key,
                # A fixed value says where the counts came from.
                value=Value(string_value=value) if value is not None else None,
                type=(
                    JsonToMetadataValueType.STRING
                    if value is not None
                    else JsonToMetadataValueType.NUMBER
                ),
            ),
        )

    rules = [rule(["usage", key], key) for key in USAGE_KEYS]
    rules.append(rule(["usage", "prompt_tokens_details", "cached_tokens"], "cached_tokens"))
    rules.append(
        rule(["usage", "completion_tokens_details", "reasoning_tokens"], "reasoning_tokens")
    )
    rules.append(rule(["usage", "prompt_tokens"], "token_source", SOURCE_PROVIDER))
    return rules


def usage_filter() -> HttpFilter:
    """Envoy reads the `usage` of a JSON answer into the request's metadata, for the access
    log entry the sidecar accounts from (json_path: access_log). Event streams pass untouched."""
    return HttpFilter(
        name=USAGE_FILTER,
        typed_config=_any(
            JsonToMetadata(
                response_rules=JsonToMetadataMatchRules(
                    rules=_usage_rules(),
                    # Its default takes exactly `application/json`: many backends add a charset.
                    allow_content_types_regex=RegexMatcher(regex=JSON_CONTENT_TYPE),
                )
            )
        ),
    )


def stream_usage_filter() -> HttpFilter:
    """Envoy reads the usage report of an event stream (the event that carries `usage`, sent
    last when the client asked for it) into the request's metadata, as usage_filter does for a
    JSON answer: a stream the downstream stage releases with its body is then accounted from the
    access log alone, with no stage of the sidecar following its chunks (request_plan). It
    parses events as they pass and holds none back."""
    return HttpFilter(
        name=STREAM_USAGE_FILTER,
        typed_config=_any(
            SseToMetadata(
                response_rules=SseToMetadataProcessingRules(
                    content_parser=TypedExtensionConfig(
                        name="envoy.content_parsers.json",
                        typed_config=_any(
                            JsonContentParser(
                                rules=[
                                    # Every event is read: the last report wins.
                                    JsonContentParserRuleConfig(rule=rule)
                                    for rule in _usage_rules()
                                ]
                            )
                        ),
                    ),
                )
            )
        ),
    )


def accounting_access_log(cfg: Config) -> AccessLog:
    """Envoy's gRPC access log to the sidecar, for the requests whose answer the sidecar
    handed over (metadata `account: true`) and those Envoy served on a native route: their
    usage, status and timing, in batches."""
    handed_over = AccessLogFilter(
        metadata_filter=MetadataFilter(
            matcher=MetadataMatcher(
                filter=METADATA_NAMESPACE,
                path=[MetadataMatcherPathSegment(key=ACCOUNT_KEY)],
                value=ValueMatcher(bool_match=True),
            ),
            # Envoy's default logs a request whose metadata lacks the key: every other
            # request (and, in a mesh, every other listener's) would be sent too.
            match_if_key_not_found=False,
        )
    )
    if native_routes(cfg):
        served = _when(f"xds.route_name.startsWith('{NATIVE_ROUTE_PREFIX}')")
        handed_over = AccessLogFilter(or_filter=OrFilter(filters=[handed_over, served]))
    return AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=handed_over,
        typed_config=_any(
            HttpGrpcAccessLogConfig(
                # With the status: a stream the observer finished, or an answer to finish here?
                additional_response_headers_to_log=["content-type"],
                common_config=CommonGrpcAccessLogConfig(
                    log_name=ACCESS_LOG_NAME,
                    grpc_service=GrpcService(
                        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SIDECAR_CLUSTER)
                    ),
                    transport_api_version=ApiVersion.V3,
                    buffer_flush_interval=_duration(ACCESS_LOG_FLUSH_S),
                    buffer_size_bytes=ACCESS_LOG_BUFFER_BYTES,
                ),
            )
        ),
    )


# The names of gateway_http_filters, in order (the benchmark's baseline removes them all).
GATEWAY_FILTERS = (
    REQUEST_HEADERS_FILTER,
    JWT_FILTER,
    REQUEST_BUFFER_FILTER,
    REQUEST_FACTS_FILTER,
    EXT_PROC_FILTER,
    OBSERVER_FILTER,
    RESPONSE_HEADERS_FILTER,
    USAGE_FILTER,
    STREAM_USAGE_FILTER,
)


def gateway_http_filters(cfg: Config) -> list[HttpFilter]:
    """The gateway's filters, in order, to go before the router (named GATEWAY_FILTERS; the
    JWT filter only with identities.jwt, the request facts only with native routes)."""
    return [
        request_headers_filter(),
        *([jwt_filter(cfg)] if cfg.identities.jwt else []),
        request_buffer_filter(cfg),
        *([request_facts_filter(cfg)] if native_routes(cfg) else []),
        ext_proc_http_filter(cfg),
        observer_http_filter(cfg),
        response_headers_filter(),
        usage_filter(),
        stream_usage_filter(),
    ]


def _status(code: int) -> HttpStatus:
    return HttpStatus(code=StatusCode(code))


def ext_proc_http_filter(cfg: Config) -> HttpFilter:
    """The downstream stage, created for every request whose headers Envoy decoded (every
    request that can reach a route), and for no other: Envoy answers a malformed request (a bad
    header, chunk or method) with a local reply that runs the response filters, and an ext_proc
    filter there holds the reply for the sidecar while Envoy closes the connection, so the
    client got no answer at all (envoyproxy/envoy#29440)."""
    return _instantiated_when(
        EXT_PROC_FILTER,
        "request",
        HttpRequestHeaderMatchInput(header_name=":method"),
        None,
        downstream_ext_proc(cfg),
        value_match=XdsStringMatcher(
            # (?s): any value at all, line breaks and all (every request has a :method).
            safe_regex=XdsRegexMatcher(google_re2=XdsRegexMatcherGoogleRe2(), regex="(?s).*")
        ),
    )


def request_headers_filter() -> HttpFilter:
    """Envoy removes every x-aigw-* header a client sent, before anything else sees the
    request. The downstream stage does too; this makes sure of it should that stage ever not
    run for a request (the routes and the upstream stage trust these headers)."""
    return HttpFilter(
        name=REQUEST_HEADERS_FILTER,
        typed_config=_any(
            HeaderMutation(
                mutations=Mutations(
                    request_mutations=[
                        HeaderMutationRule(
                            remove_on_match=HeaderMutationRemoveOnMatch(
                                key_matcher=StringMatcher(prefix=INTERNAL_HEADER_PREFIX)
                            )
                        )
                    ]
                )
            )
        ),
    )


def request_buffer_filter(cfg: Config) -> HttpFilter:
    """Envoy reads the whole request body before the sidecar sees the request: a body that
    breaks off (a bad chunk) or grows past the limit is answered by Envoy (400, 413) before the
    downstream stage exists, so it never holds that answer (see ext_proc_http_filter). The
    sidecar reads the body whole anyway (BUFFERED), so nothing waits longer."""
    return HttpFilter(
        name=REQUEST_BUFFER_FILTER,
        typed_config=_any(Buffer(max_request_bytes=cfg.sidecar.max_body_bytes)),
    )


def _openai_error_body(message: str, type_: str, code: str) -> SubstitutionFormatString:
    return SubstitutionFormatString(
        json_format=Struct.from_dict(error_object(message, type_, code)),
        content_type="application/json",
    )


# Which of Envoy's local replies the mappers below rewrite, by the reply's response code
# details. The sidecar's own answers (details `aigw_...`, see DownstreamStream.reject) and the
# routes Envoy answers itself (`direct_response`, see _error_route) already have their body.
# Envoy's ext_proc filter says `ext_proc_error_gRPC_error_<code>` when the sidecar cannot be
# reached or fails, and `ext_proc_error_per-message_timeout_exceeded` when it does not answer
# in time; neither sets a response flag, so only these details tell them apart.
ENVOYS_OWN_REPLY = (
    "response.code >= 400 && !response.code_details.startsWith('aigw_') && "
    "response.code_details != 'direct_response'"
)
SIDECAR_TIMED_OUT = "response.code_details.startsWith('ext_proc_error_per-message_timeout')"
SIDECAR_FAILED = "response.code_details.startsWith('ext_proc_error')"


def _when(expression: str) -> AccessLogFilter:
    return AccessLogFilter(
        extension_filter=ExtensionFilter(
            name="envoy.access_loggers.extension_filters.cel",
            typed_config=_any(ExpressionFilter(expression=expression)),
        )
    )


def _local_reply(cfg: Config) -> LocalReplyConfig:
    """Every answer Envoy makes itself gets the client API's error shape: a sidecar that is down
    or does not answer in time (the configured failure status), a body over the limit (the same
    answer as the sidecar's for a Content-Length over it), a malformed request (4xx), an
    unreachable or failing backend (5xx). The first mapper that matches applies: Anthropic's
    shape for a request to its Messages API refused before the sidecar routed it (by its path,
    which no stage rewrote yet; once the sidecar routed it, the downstream stage makes Envoy's
    answer the client's itself), OpenAI's for every other."""
    failure = cfg.sidecar.failure_status
    retry = [
        HeaderValueOption(
            header=HeaderValue(key="retry-after", value="1"),
            append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    ]
    too_large = errors.too_large(cfg.sidecar.max_body_bytes)
    # (condition, status to answer with or None: Envoy's, headers, message, type, code)
    replies: list[tuple[str, int | None, list[HeaderValueOption], str, str, str]] = [
        (
            SIDECAR_TIMED_OUT, failure, retry,
            "The gateway's policy service did not answer in time; retry shortly",
            "server_error", "gateway_timeout",
        ),
        (
            SIDECAR_FAILED, failure, retry,
            "The gateway's policy service is unavailable; retry shortly",
            "server_error", "gateway_unavailable",
        ),
        (
            f"response.code == 413 && {ENVOYS_OWN_REPLY}", None, [],
            too_large.message, too_large.type, too_large.code or "request_too_large",
        ),
        (
            f"response.code < 500 && {ENVOYS_OWN_REPLY}", None, [],
            "The gateway cannot accept this HTTP request (%RESPONSE_CODE_DETAILS%)",
            "invalid_request_error", "%RESPONSE_CODE_DETAILS%",
        ),
        (
            ENVOYS_OWN_REPLY, None, [],
            "%LOCAL_REPLY_BODY%", "server_error", "%RESPONSE_CODE_DETAILS%",
        ),
    ]  # fmt: skip
    anthropic = f"request.url_path.startsWith('{ANTHROPIC_MESSAGES.path}')"
    mappers = [
        ResponseMapper(
            filter=_when(f"{anthropic} && ({condition})"),
            status_code=status,
            headers_to_add=headers,
            body_format_override=SubstitutionFormatString(
                json_format=Struct.from_dict(
                    {
                        "type": "error",
                        "error": {"type": _anthropic_type(type_, code), "message": message},
                    }
                ),
                content_type="application/json",
            ),
        )
        # Not the last: Envoy's replies on the way to a backend (a timeout, a reset) come after
        # the sidecar routed the request, whose path may then be the backend's (an OpenAI
        # client's request to Anthropic's API is at /v1/messages by then). The downstream stage
        # gives those to a bridged client in its API's shape.
        for condition, status, headers, message, type_, code in replies[:-1]
    ]
    mappers += [
        ResponseMapper(
            filter=_when(condition),
            status_code=status,
            headers_to_add=headers,
            body_format_override=_openai_error_body(message, type_, code),
        )
        for condition, status, headers, message, type_, code in replies
    ]
    return LocalReplyConfig(mappers=mappers)


def _anthropic_type(openai_type: str, code: str) -> str:
    """Anthropic's error type for one of Envoy's own replies: a body too large has its own,
    Envoy's other 4xx are the request's, the rest the gateway's."""
    if code == "request_too_large":
        return "request_too_large"
    return "invalid_request_error" if openai_type == "invalid_request_error" else "api_error"


def routes(cfg: Config) -> RouteConfiguration:
    route_list: list[Route] = []
    for name, model in cfg.models.items():
        backends = [cfg.backends[t.backend] for t in model.targets]
        action = RouteAction(
            timeout=_duration(max(b.timeout_s for b in backends)),
            auto_host_rewrite=True,
            prefix_rewrite=f"{backends[0].base_path}/" if backends[0].base_path != "/v1" else "",
        )
        active = [t for t in model.targets if t.weight > 0]
        direct: list[str] = []
        target = ""
        if pooled(model):
            action.cluster = pool_cluster_name(name)
            action.retry_policy = _failover_retries(model)
        elif split(model):
            action.weighted_clusters = WeightedCluster(
                clusters=[
                    WeightedClusterClusterWeight(
                        name=split_cluster_name(t.backend), weight=t.weight
                    )
                    for t in active
                ]
            )
        else:
            # One backend: the downstream stage set its credential and model name already.
            action.cluster = cluster_name(active[0].backend)
            direct = INTERNAL_REQUEST_HEADERS
            target = active[0].backend
        # A model with a backend of another API or addressing (providers/: Anthropic's, Azure's
        # deployments, ...): the sidecar sets every request's path, so its routes match any
        # path and rewrite none.
        adapted = any(cfg.backends[t.backend].type != "openai" for t in active)
        prefix = "/" if adapted else "/v1/"
        if adapted:
            action.prefix_rewrite = ""
        add, strip = _provider_headers(cfg.backends[target]) if target and adapted else ([], [])
        if model.quota_failover:
            # The sidecar pins a request whose quota is exhausted to the next pool.
            pool1 = pools(model)[1]
            pool1_add, pool1_strip = (
                _provider_headers(cfg.backends[pool1[0].backend])
                if adapted and len(pool1) == 1
                else ([], [])
            )
            route_list.append(
                Route(
                    name=f"model:{name}:pool1",
                    match=RouteMatch(
                        prefix=prefix,
                        headers=[
                            _exact(ROUTE_HEADER, name),
                            _exact(POOL_HEADER, "1"),
                            *([_exact(TARGET_HEADER, pool1[0].backend)] if len(pool1) == 1 else []),
                        ],
                    ),
                    route=RouteAction(
                        cluster=pool_member_cluster(name, 1, pool1),
                        timeout=action.timeout,
                        auto_host_rewrite=True,
                        prefix_rewrite=action.prefix_rewrite,
                    ),
                    request_headers_to_remove=(
                        INTERNAL_REQUEST_HEADERS + pool1_strip if len(pool1) == 1 else []
                    ),
                    request_headers_to_add=pool1_add,
                )
            )
        route_list.append(
            Route(
                name=f"model:{name}",
                match=RouteMatch(
                    prefix=prefix,
                    headers=[
                        _exact(ROUTE_HEADER, name),
                        *([_exact(TARGET_HEADER, target)] if target else []),
                    ],
                ),
                route=action,
                # No upstream stage on a direct route removes them: the route does.
                request_headers_to_remove=direct + strip,
                request_headers_to_add=add,
            )
        )
        if target:
            # The sidecar prepared the request for another backend than this route's: its
            # config changed and this Envoy config is older. Refuse rather than send one
            # backend's credential to another.
            route_list.append(_stale_route(name))
    # CONNECT has no body that ends: the request buffer would wait for it until the request
    # timeout. A route for it makes Envoy, which has no CONNECT upgrade configured, refuse it
    # at once (403 upgrade_failed, in OpenAI's shape); the gateway tunnels nothing.
    connect = _error_route(
        "connect",
        RouteMatch(connect_matcher=RouteMatchConnectMatcher()),
        405,
        "The gateway does not tunnel (CONNECT)",
        "invalid_request_error",
        "method_not_allowed",
    )
    route_list[0:0] = [connect, *native_route_list(cfg)]
    # Reached only by a request the sidecar did not route (it answers everything it rejects).
    route_list.append(
        _error_route(
            "unrouted",
            RouteMatch(prefix="/"),
            404,
            "No model route matched this request",
            "invalid_request_error",
            "unknown_url",
        )
    )
    return RouteConfiguration(
        name="aigw",
        virtual_hosts=[
            VirtualHost(
                name="aigw",
                domains=["*"],
                routes=route_list,
                # x-envoy-attempt-count on the answer: the sidecar reports a failover from it.
                include_attempt_count_in_response=True,
            )
        ],
        # The internal headers are the gateway's own: a client or backend never sets them.
        internal_only_headers=[],
    )


def _exact(header: str, value: str) -> HeaderMatcher:
    return HeaderMatcher(name=header, string_match=StringMatcher(exact=value))


def _stale_route(model: str) -> Route:
    return _error_route(
        f"model:{model}:stale",
        RouteMatch(prefix="/v1/", headers=[_exact(ROUTE_HEADER, model)]),
        503,
        "The gateway is being reconfigured; retry shortly",
        "server_error",
        "envoy_config_out_of_date",
    )


def _error_route(
    name: str, match: RouteMatch, status: int, message: str, type_: str, code: str
) -> Route:
    """A route Envoy answers itself, with an OpenAI-style error."""
    body = error_body(message, type_, code).decode()
    return Route(
        name=name,
        match=match,
        direct_response=DirectResponseAction(status=status, body=DataSource(inline_string=body)),
        response_headers_to_add=[
            HeaderValueOption(header=HeaderValue(key="content-type", value="application/json"))
        ],
    )


def _provider_headers(backend: Backend) -> tuple[list[HeaderValueOption], list[str]]:
    """What a direct route to `backend` adds for its API (a version header), and what it
    removes: the headers of other providers' APIs a client may have sent (another API's
    options would change what it asked). Its own API's options (Anthropic's betas) are the
    sidecar's to remove (request_plan.py): a client that speaks that API means them."""
    own, others = request_headers(backend.type)
    if translates(backend.type):
        others = [h for h in others if h not in provider(backend.type).strip_headers]
    add = [
        HeaderValueOption(
            header=HeaderValue(key=key, value=value),
            append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for key, value in own.items()
    ]
    return add, others


def _failover_retries(model: Model) -> RetryPolicy:
    """A failed attempt (429, 5xx, connect failure, reset before the answer started) goes to
    the next pool in the same request. Envoy never retries once response headers went to the
    client, so a stream that started is never retried."""
    return RetryPolicy(
        retry_on="5xx,reset,connect-failure,retriable-status-codes",
        retriable_status_codes=[429],
        num_retries=len(pools(model)) - 1,
        per_try_idle_timeout=_duration(model.stall_timeout_s) if model.stall_timeout_s else None,
        retry_priority=RetryPolicyRetryPriority(
            name="envoy.retry_priorities.previous_priorities",
            typed_config=_any(PreviousPrioritiesConfig(update_frequency=1)),
        ),
        # The retry goes to another pool, not back to the one that failed: nothing to wait
        # for. Envoy's default back-off (25 ms base, jittered) would add up to 25 ms per
        # failover; a small one keeps a failover invisible to the client.
        retry_back_off=RetryPolicyRetryBackOff(
            base_interval=_duration(FAILOVER_BACKOFF_S), max_interval=_duration(0.01)
        ),
    )


def pool_cluster(cfg: Config, name: str, model: Model) -> Cluster:
    """An aggregate of the model's pools in priority order (a pool of one backend is that
    backend's cluster), with the upstream stage in its own filter chain (the member clusters'
    chains do not run under an aggregate)."""
    members = [pool_member_cluster(name, p, targets) for p, targets in enumerate(pools(model))]
    backends = [cfg.backends[t.backend] for t in model.targets]
    return Cluster(
        name=pool_cluster_name(name),
        connect_timeout=_duration(max(b.connect_timeout_s for b in backends)),
        lb_policy=ClusterLbPolicy.CLUSTER_PROVIDED,
        circuit_breakers=_circuit_breakers(sum(b.max_requests for b in backends)),
        cluster_type=ClusterCustomClusterType(
            name="envoy.clusters.aggregate",
            typed_config=_any(AggregateClusterConfig(clusters=members)),
        ),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: _upstream_http_options(cfg, None)},
    )


# -- the native path (native.py): Envoy identifies, routes and serves on its own ---------------


def jwks_cluster_name(issuer: str) -> str:
    return f"aigw-jwks-{issuer}"


def _jwt_provider(cfg: Config, name: str) -> JwtProvider:
    issuer = cfg.identities.jwt[name]
    provider = JwtProvider(
        issuer=issuer.issuer,
        audiences=issuer.audiences,
        require_expiration=True,
        clock_skew_seconds=issuer.clock_skew_s,
        # Only the Authorization header (a token in a query string ends up in logs), its
        # scheme in either case, as the sidecar takes a key's (RFC 7235: case-insensitive).
        from_headers=[
            JwtHeader(name="authorization", value_prefix=prefix)
            for prefix in ("Bearer ", "bearer ")
        ],
        # The token never goes upstream: the backend gets its own credential.
        forward=False,
        payload_in_metadata=name,
        failed_status_in_metadata=jwt_failure_key(name),
        # No jwt_cache_config: Envoy's cache of verified tokens skips the signature check of a
        # token it saw before, so a key the provider removed from its JWKS would keep its
        # tokens valid until they expire. Each request's token is verified (tens of µs).
    )
    jwks = issuer.jwks
    if jwks.uri is not None:
        provider.remote_jwks = RemoteJwks(
            http_uri=HttpUri(
                uri=jwks.uri, cluster=jwks_cluster_name(name), timeout=_duration(jwks.timeout_s)
            ),
            cache_duration=_duration(jwks.cache_s),
            # Fetched when Envoy starts, not by the first request that needs it.
            async_fetch=JwksAsyncFetch(),
        )
    elif jwks.file is not None:
        provider.local_jwks = DataSource(filename=str(jwks.file))
    else:
        provider.local_jwks = DataSource(inline_string=jwks.inline)
    return provider


def jwt_filter(cfg: Config) -> HttpFilter:
    """Envoy verifies the bearer tokens of identities.jwt (signature, issuer, audiences,
    expiry) and writes a valid token's claims into the request's metadata (JWT_NAMESPACE, under
    the issuer's name). Nothing is refused here: a request with an API key, with no credential
    or with a token that failed goes on to the downstream stage, which checks the key or answers
    the token's failure (also in the metadata) with a 401 in the client's API shape."""
    names = list(cfg.identities.jwt)
    requirement = JwtRequirement(
        requires_any=JwtRequirementOrList(
            requirements=[JwtRequirement(provider_name=n) for n in names]
            + [JwtRequirement(allow_missing_or_failed=Empty())]
        )
    )
    return HttpFilter(
        name=JWT_FILTER,
        typed_config=_any(
            JwtAuthentication(
                providers={n: _jwt_provider(cfg, n) for n in names},
                rules=[RequirementRule(match=RouteMatch(prefix="/"), requires=requirement)],
            )
        ),
    )


def request_facts_filter(cfg: Config) -> HttpFilter:
    """Envoy reads the request body's model and whether it streams (and asked for the stream's
    usage) into the request's metadata, for the native routes to match, and picks the route
    again (json_to_metadata clears the route cache)."""

    def rule(path: list[str], key: str, kind: JsonToMetadataValueType) -> JsonToMetadataRule:
        return JsonToMetadataRule(
            selectors=[JsonToMetadataSelector(key=k) for k in path],
            on_present=JsonToMetadataKeyValuePair(
                metadata_namespace=REQUEST_NAMESPACE, key=key, type=kind
            ),
        )

    as_is = JsonToMetadataValueType.PROTOBUF_VALUE
    return HttpFilter(
        name=REQUEST_FACTS_FILTER,
        typed_config=_any(
            JsonToMetadata(
                request_rules=JsonToMetadataMatchRules(
                    rules=[
                        rule(["model"], "model", JsonToMetadataValueType.STRING),
                        rule(["stream"], "stream", as_is),
                        rule(["stream_options", "include_usage"], "include_usage", as_is),
                    ],
                    allow_content_types_regex=RegexMatcher(regex=JSON_CONTENT_TYPE),
                )
            )
        ),
    )


def _segments(*keys: str) -> list[MetadataMatcherPathSegment]:
    return [MetadataMatcherPathSegment(key=k) for k in keys]


def _claim_matcher(issuer: str, rule: ClaimRule, invert: bool = False) -> MetadataMatcher:
    """The token's claim is the rule's value, or a list that holds it."""
    exact = ValueMatcher(string_match=StringMatcher(exact=rule.value))
    return MetadataMatcher(
        filter=JWT_NAMESPACE,
        path=_segments(issuer, *rule.path),
        value=ValueMatcher(
            or_match=OrMatcher(
                value_matchers=[exact, ValueMatcher(list_match=ListMatcher(one_of=exact))]
            )
        ),
        invert=invert,
    )


def _fact(key: str, value: ValueMatcher, invert: bool = False) -> MetadataMatcher:
    return MetadataMatcher(
        filter=REQUEST_NAMESPACE, path=_segments(key), value=value, invert=invert
    )


def native_route_list(cfg: Config) -> list[Route]:
    """Two routes per native (team, model) pair, tried before every other route: one for
    requests that do not stream, one for streams whose client asked for the usage report
    (Envoy's stream_usage filter reads it; a stream without one goes to the sidecar, which asks
    the backend for it). No ext_proc stage runs on them."""
    out: list[Route] = []
    is_true = ValueMatcher(bool_match=True)
    for native in native_routes(cfg):
        backend = cfg.backends[native.backend]
        caller = [_claim_matcher(native.issuer, r, invert=True) for r in native.earlier]
        caller.append(_claim_matcher(native.issuer, native.rule))
        caller.append(_fact("model", ValueMatcher(string_match=StringMatcher(exact=native.model))))
        rewrite = "" if backend.base_path == "/v1" else backend.base_path + native.path[3:]
        variants = [("json", _fact("stream", is_true, invert=True))]
        if cfg.sidecar.stream_path == "auto":
            # (`observe` and `inline` want every stream followed by the sidecar.)
            variants.append(("stream", _fact("include_usage", is_true)))
        for variant, condition in variants:
            out.append(
                Route(
                    name=native_route_name(native.team, native.model, variant),
                    match=RouteMatch(
                        path=native.path,
                        headers=[_exact(":method", "POST")],
                        dynamic_metadata=[*caller, condition],
                    ),
                    route=RouteAction(
                        cluster=cluster_name(native.backend),
                        timeout=_duration(backend.timeout_s),
                        auto_host_rewrite=True,
                        prefix_rewrite=rewrite,
                    ),
                    # The backend's own credential replaces the client's (credential_injector);
                    # an answer must come uncompressed for Envoy to read its usage.
                    request_headers_to_remove=list(
                        dict.fromkeys(["api-key", backend.auth_header, "accept-encoding"])
                    ),
                    typed_per_filter_config={
                        EXT_PROC_FILTER: _any(ExtProcPerRoute(disabled=True)),
                        RESPONSE_HEADERS_FILTER: _any(
                            HeaderMutationPerRoute(mutations=_native_headers(native))
                        ),
                    },
                )
            )
    return out


def _native_headers(native: NativeRoute) -> Mutations:
    """The gateway's headers on a native route's answer, as the downstream stage would have put
    them in the metadata (the response headers filter applies them after its own)."""
    values = {"team": native.team, "model": native.model, "backend": native.backend}
    values["provider_model"] = native.model
    overwrite = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
    return Mutations(
        response_mutations=[
            HeaderMutationRule(
                append=HeaderValueOption(
                    header=HeaderValue(key=header, value=values[key]), append_action=overwrite
                )
            )
            for header, key in RESPONSE_HEADER_KEYS.items()
            if key in values
        ]
    )


def native_backends(cfg: Config) -> set[str]:
    return {native.backend for native in native_routes(cfg)}


def credential_secret_name(backend: str) -> str:
    return f"aigw-credential-{backend}"


def credential_secret(cfg: Config, backend: str) -> Secret:
    """A backend's credential for Envoy to send on native routes: a reference to the same
    environment variable or file the sidecar reads, never the secret itself."""
    ref = cfg.backends[backend].api_key
    assert ref is not None
    source = (
        DataSource(environment_variable=ref.env)
        if ref.env is not None
        else DataSource(filename=str(ref.file))
    )
    return Secret(name=credential_secret_name(backend), generic_secret=GenericSecret(secret=source))


def credential_filter(cfg: Config, backend: str) -> HttpFilter:
    """In the backend's cluster: its credential, on the requests that come without one (the
    native routes remove the client's). Not over what the downstream stage set: the sidecar
    re-reads a rotated credential on reload, while Envoy reads its secret once, at start."""
    header = cfg.backends[backend].auth_header
    return HttpFilter(
        name=CREDENTIAL_FILTER,
        typed_config=_any(
            CredentialInjector(
                overwrite=False,
                credential=TypedExtensionConfig(
                    name="envoy.http.injected_credentials.generic",
                    typed_config=_any(
                        Generic(
                            credential=SdsSecretConfig(name=credential_secret_name(backend)),
                            header=header,
                            header_value_prefix="Bearer " if header == "authorization" else "",
                        )
                    ),
                ),
            )
        ),
    )


def jwks_cluster(cfg: Config, issuer: str) -> Cluster:
    jwks = cfg.identities.jwt[issuer].jwks
    tls = (jwks.uri or "").startswith("https:")
    return _host_cluster(jwks_cluster_name(issuer), jwks.host, jwks.port, tls, jwks.timeout_s)


def http_connection_manager(cfg: Config) -> HttpConnectionManager:
    hcm = HttpConnectionManager(
        stat_prefix="aigw",
        route_config=routes(cfg),
        http_filters=[
            *gateway_http_filters(cfg),
            HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
        ],
        local_reply_config=_local_reply(cfg),
        # LLM streams run for minutes; the per-route timeout bounds the whole answer.
        stream_idle_timeout=_duration(600),
        # The request itself must arrive in time: Envoy reads the whole body before the sidecar
        # sees it (request_buffer_filter), so a slow or idle client holds at most this long
        # what it sent. (Disarmed once the request went upstream, or the answer began.)
        request_timeout=_duration(REQUEST_RECEIVE_TIMEOUT_S),
        request_headers_timeout=_duration(REQUEST_HEADERS_TIMEOUT_S),
        tracing=_tracing(cfg),
    )
    hcm.access_log = [accounting_access_log(cfg)]
    if cfg.envoy.access_log:
        hcm.access_log += [
            AccessLog(
                name="envoy.access_loggers.stdout",
                typed_config=_any(
                    StdoutAccessLog(
                        log_format=SubstitutionFormatString(
                            json_format=Struct.from_dict(ACCESS_LOG_FORMAT)
                        )
                    )
                ),
            )
        ]
    return hcm


def envoy_traces(cfg: Config) -> bool:
    """Envoy starts (or continues) the trace and sends it to the same collector as the
    sidecar; its ext_proc filter hands the sidecar its span as the gRPC call's traceparent."""
    tracing = cfg.observability.tracing
    return tracing.enabled and tracing.otlp_endpoint is not None


def _tracing(cfg: Config) -> HttpConnectionManagerTracing | None:
    if not envoy_traces(cfg):
        return None
    settings = cfg.observability.tracing
    return HttpConnectionManagerTracing(
        random_sampling=Percent(value=settings.sample_ratio * 100),
        spawn_upstream_span=True,
        provider=TracingHttp(
            name="envoy.tracers.opentelemetry",
            typed_config=_any(
                OpenTelemetryConfig(
                    grpc_service=GrpcService(
                        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=OTLP_CLUSTER),
                        timeout=_duration(1),
                    ),
                    service_name=f"{settings.service_name}-envoy",
                )
            ),
        ),
    )


def otlp_cluster(cfg: Config) -> Cluster:
    endpoint = cfg.observability.tracing.otlp_endpoint
    assert endpoint is not None
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 4317)
    cluster = _host_cluster(OTLP_CLUSTER, parts.hostname or "127.0.0.1", port, tls, 1.0)
    cluster.typed_extension_protocol_options = {HTTP_PROTOCOL_OPTIONS: _http2_options()}
    return cluster


def _host_cluster(name: str, host: str, port: int, tls: bool, connect_timeout_s: float) -> Cluster:
    """A cluster of one host found by DNS (a collector, an identity provider), over TLS when
    `tls`, its certificate checked for the host's name."""
    address = Address(socket_address=SocketAddress(address=host, port_value=port))
    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_duration(connect_timeout_s),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=address))])
            ],
        ),
    )
    if tls:
        cluster.transport_socket = _tls_socket(host)
    return cluster


def _http2_options() -> AnyMsg:
    return _any(
        HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http2_protocol_options=Http2ProtocolOptions()
            )
        )
    )


AWS_SIGNING_FILTER = "envoy.filters.http.aws_request_signing"


def _upstream_http_options(
    cfg: Config,
    backend: str | None,
    stage: bool = True,
    credential_of: str | None = None,
    signing_region: str | None = None,
    signing_host: str = "",
) -> AnyMsg:
    """HTTP/1.1 to the backend; with `stage`, the upstream ext_proc stage before the codec
    (`backend` names the cluster's one backend; None: each attempt's host says it); with
    `credential_of`, Envoy sets that backend's credential itself (a backend of native routes);
    with `signing_region`, Envoy signs each request for Bedrock in that AWS region (SigV4),
    after the stage: what it signs is the request as it leaves."""
    options = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http_protocol_options=Http1ProtocolOptions()
        )
    )
    filters = []
    if stage:
        filters.append(
            HttpFilter(name=EXT_PROC_FILTER, typed_config=_any(upstream_ext_proc(cfg, backend)))
        )
    if credential_of is not None and cfg.backends[credential_of].api_key is not None:
        filters.append(credential_filter(cfg, credential_of))
    if signing_region is not None:
        # The standard AWS credential chain of Envoy's environment (variables, shared profile,
        # web identity, container and instance roles), refreshed by Envoy. The body is hashed
        # (buffered): Bedrock's runtime takes no unsigned payload.
        # The host is set before signing: Envoy can otherwise sign the client's Host and only
        # then rewrite it for the backend (seen on a cluster's first request).
        signing = AwsRequestSigning(
            service_name="bedrock", region=signing_region, host_rewrite=signing_host
        )
        filters.append(HttpFilter(name=AWS_SIGNING_FILTER, typed_config=_any(signing)))
    if filters:
        codec = HttpFilter(
            name="envoy.filters.http.upstream_codec", typed_config=_any(UpstreamCodec())
        )
        options.http_filters = [*filters, codec]
    return _any(options)


def _circuit_breakers(max_requests: int) -> CircuitBreakers:
    return CircuitBreakers(
        thresholds=[
            CircuitBreakersThresholds(
                max_connections=max_requests,
                max_pending_requests=max_requests,
                max_requests=max_requests,
                # Envoy allows 3 concurrent retries per cluster by default: under load a
                # failing pool would then send its errors to the clients instead of failing over.
                max_retries=max_requests,
            )
        ]
    )


def _endpoint(cfg: Config, name: str, weight: int | None = None) -> LbEndpoint:
    backend = cfg.backends[name]
    names_backend = Struct.from_dict({"backend": name})
    return LbEndpoint(
        endpoint=Endpoint(
            address=Address(
                socket_address=SocketAddress(address=backend.host, port_value=backend.port)
            ),
            hostname=backend.host,
        ),
        load_balancing_weight=weight,
        # Names the backend to the upstream stage of a pooled model, and picks its TLS
        # settings in a cluster that holds several backends.
        metadata=Metadata(
            filter_metadata={
                METADATA_NAMESPACE: names_backend,
                TRANSPORT_SOCKET_MATCH: Struct.from_dict({"backend": name}),
            }
        ),
    )


def _tls_socket(host: str) -> TransportSocket:
    return TransportSocket(
        name="envoy.transport_sockets.tls",
        typed_config=_any(
            UpstreamTlsContext(
                sni=host,
                common_tls_context=CommonTlsContext(
                    validation_context=CertificateValidationContext(
                        trusted_ca=DataSource(filename=DEFAULT_CA_BUNDLE),
                        # The certificate must be the host's, not just any a public CA signed.
                        match_typed_subject_alt_names=[
                            SubjectAltNameMatcher(
                                san_type=SubjectAltNameMatcherSanType.DNS,
                                matcher=StringMatcher(exact=host),
                            )
                        ],
                    )
                ),
            )
        ),
    )


def _outlier_detection(failures: int, eject_for_s: float) -> OutlierDetection:
    # Passive health: a backend that keeps failing is skipped for a while (then tried
    # again); a pooled model's traffic moves to its next pool meanwhile.
    return OutlierDetection(
        consecutive_5xx=failures,
        consecutive_gateway_failure=failures,
        interval=_duration(5),
        base_ejection_time=_duration(eject_for_s),
        max_ejection_percent=100,
    )


def backend_cluster(cfg: Config, name: str, staged: bool = False) -> Cluster:
    """A backend's cluster; `staged` (a canary's member) runs the upstream stage, which sets
    the credential and model name of whichever backend Envoy picked."""
    backend = cfg.backends[name]
    cluster_id = split_cluster_name(name) if staged else cluster_name(name)
    cluster = Cluster(
        name=cluster_id,
        type=ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_duration(backend.connect_timeout_s),
        circuit_breakers=_circuit_breakers(backend.max_requests),
        load_assignment=ClusterLoadAssignment(
            cluster_name=cluster_id,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[_endpoint(cfg, name)])],
        ),
        typed_extension_protocol_options={
            HTTP_PROTOCOL_OPTIONS: _upstream_http_options(
                cfg,
                name if staged else None,
                staged,
                credential_of=name if not staged and name in native_backends(cfg) else None,
                signing_region=backend.signing_region,
                signing_host=backend.host,
            )
        },
        outlier_detection=_outlier_detection(backend.eject_after_failures, backend.eject_for_s),
    )
    if backend.tls:
        cluster.transport_socket = _tls_socket(backend.host)
    return cluster


def multi_pool_cluster(cfg: Config, model: str, priority: int, targets: list[Target]) -> Cluster:
    """One pool of several backends: one endpoint each, weighted, each with its own TLS
    settings, and the upstream stage reading each attempt's backend from the host."""
    backends = [cfg.backends[t.backend] for t in targets]
    name = f"{pool_cluster_name(model)}-{priority}"
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_duration(max(b.connect_timeout_s for b in backends)),
        circuit_breakers=_circuit_breakers(sum(b.max_requests for b in backends)),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[_endpoint(cfg, t.backend, t.weight) for t in targets]
                )
            ],
        ),
        transport_socket_matches=[
            ClusterTransportSocketMatch(
                name=t.backend,
                match=Struct.from_dict({"backend": t.backend}),
                transport_socket=_tls_socket(b.host),
            )
            for t, b in zip(targets, backends, strict=True)
            if b.tls
        ],
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: _upstream_http_options(cfg, None)},
        outlier_detection=_outlier_detection(
            min(b.eject_after_failures for b in backends), min(b.eject_for_s for b in backends)
        ),
    )


def pool_member_cluster(model: str, priority: int, targets: list[Target]) -> str:
    if len(targets) == 1:
        return cluster_name(targets[0].backend)
    return f"{pool_cluster_name(model)}-{priority}"


# With several sidecar workers on one port, Envoy opens one HTTP/2 connection per host and
# per worker thread, and the kernel hands each new connection to one worker (SO_REUSEPORT):
# the same address listed several times gives enough connections to spread over them.
CONNECTIONS_PER_WORKER = 4


def sidecar_cluster(cfg: Config) -> Cluster:
    address = _socket(cfg.sidecar.listen)
    copies = 1 if cfg.sidecar.workers == 1 else CONNECTIONS_PER_WORKER * cfg.sidecar.workers
    return Cluster(
        name=SIDECAR_CLUSTER,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=_duration(1),
        # Every request in flight holds one stream here (two while its upstream stage runs).
        circuit_breakers=_circuit_breakers(2 * cfg.envoy.max_requests),
        load_assignment=ClusterLoadAssignment(
            cluster_name=SIDECAR_CLUSTER,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=address))] * copies
                )
            ],
        ),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: _http2_options()},
        health_checks=[
            HealthCheck(
                timeout=_duration(1),
                interval=_duration(2),
                unhealthy_threshold=2,
                healthy_threshold=1,
                grpc_health_check=HealthCheckGrpcHealthCheck(
                    service_name="envoy.service.ext_proc.v3.ExternalProcessor"
                ),
            )
        ],
    )


def bootstrap(cfg: Config) -> Bootstrap:
    listener = Listener(
        name="aigw",
        address=_socket(cfg.envoy.listen),
        # Room for the largest body the sidecar accepts, so Envoy buffers it for inspection.
        per_connection_buffer_limit_bytes=cfg.sidecar.max_body_bytes + 65536,
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(http_connection_manager(cfg)),
                    )
                ]
            )
        ],
    )
    clusters = [sidecar_cluster(cfg)] + [backend_cluster(cfg, name) for name in cfg.backends]
    in_splits = {t.backend for m in cfg.models.values() if split(m) for t in m.targets}
    clusters += [backend_cluster(cfg, name, staged=True) for name in sorted(in_splits)]
    for name, m in cfg.models.items():
        if pooled(m):
            clusters += [
                multi_pool_cluster(cfg, name, p, targets)
                for p, targets in enumerate(pools(m))
                if len(targets) > 1
            ]
            clusters.append(pool_cluster(cfg, name, m))
    if envoy_traces(cfg):
        clusters.append(otlp_cluster(cfg))
    clusters += jwks_clusters(cfg)
    secrets = [
        credential_secret(cfg, name)
        for name in sorted(native_backends(cfg))
        if cfg.backends[name].api_key is not None
    ]
    return Bootstrap(
        admin=Admin(address=_socket(cfg.envoy.admin)),
        static_resources=BootstrapStaticResources(
            listeners=[listener], clusters=clusters, secrets=secrets
        ),
    )


# betterproto2 camel-cases `consecutive_5xx` as "consecutive5Xx", which Envoy rejects; Envoy
# takes the proto field name as well.
_KEY_FIXES = {"consecutive5Xx": "consecutive_5xx"}


def to_dict(msg: betterproto2.Message) -> dict[str, Any]:
    return _fix_keys(msg.to_dict())


def _fix_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {_KEY_FIXES.get(k, k): _fix_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_keys(v) for v in value]
    return value


def render_yaml(cfg: Config) -> str:
    header = (
        "# Rendered by `extproc envoy` from the gateway config; edit that file, not this one.\n"
    )
    return header + yaml.safe_dump(to_dict(bootstrap(cfg)), sort_keys=False, width=100)


def jwks_clusters(cfg: Config) -> list[Cluster]:
    """The clusters Envoy fetches the issuers' JWKS from (those given by `uri`)."""
    return [
        jwks_cluster(cfg, name) for name, i in cfg.identities.jwt.items() if i.jwks.uri is not None
    ]


def _dropin_clusters(cfg: Config) -> list[Cluster]:
    """The clusters a drop-in adds: the sidecar's, and those Envoy fetches JWKS from."""
    return [sidecar_cluster(cfg), *jwks_clusters(cfg)]


def render_snippet(cfg: Config) -> str:
    """The drop-in for an existing Envoy: the HTTP filter and the sidecar's cluster."""
    doc = {
        "http_filters": [to_dict(f) for f in gateway_http_filters(cfg)],
        "access_log": [to_dict(accounting_access_log(cfg))],
        "local_reply_config": to_dict(_local_reply(cfg)),
        "clusters": [to_dict(c) for c in _dropin_clusters(cfg)],
    }
    return (
        "# Drop-in for an existing Envoy (rendered by `extproc envoy --snippet`).\n"
        "# 1. Put the filters in your HttpConnectionManager's http_filters, before\n"
        "#    envoy.filters.http.router, in this order. 2. Add the access log to its access_log\n"
        "#    (the sidecar accounts handed-over answers from it). 3. Set local_reply_config on it\n"
        "#    (Envoy's own errors, and a sidecar that is down, answered in OpenAI's error shape).\n"
        "#    4. Add the cluster to your clusters. 5. Give each model a route that matches the\n"
        "#    header x-aigw-model (see docs/dropin.md).\n"
        + yaml.safe_dump(doc, sort_keys=False, width=100)
    )


def render_istio(cfg: Config, namespace: str = "default") -> str:
    """An Istio EnvoyFilter that adds the same filter and cluster to sidecars and gateways."""
    # Each patch goes right before the router, so applied in order they keep the filters'.
    filter_patches = [
        {
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": "ANY",
                "listener": {
                    "filterChain": {
                        "filter": {
                            "name": "envoy.filters.network.http_connection_manager",
                            "subFilter": {"name": "envoy.filters.http.router"},
                        }
                    }
                },
            },
            "patch": {"operation": "INSERT_BEFORE", "value": to_dict(f)},
        }
        for f in gateway_http_filters(cfg)
    ]
    # The sidecar accounts handed-over answers from Envoy's gRPC access log; Envoy's own
    # answers get OpenAI's error shape.
    access_log_patch = {
        "applyTo": "NETWORK_FILTER",
        "match": {
            "context": "ANY",
            "listener": {
                "filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}
            },
        },
        "patch": {
            "operation": "MERGE",
            "value": {
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network"
                    ".http_connection_manager.v3.HttpConnectionManager",
                    "access_log": [to_dict(accounting_access_log(cfg))],
                    "local_reply_config": to_dict(_local_reply(cfg)),
                }
            },
        },
    }
    manifest = {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "extproc-ai-gateway", "namespace": namespace},
        "spec": {
            "workloadSelector": {"labels": {"extproc.io/ai-gateway": "enabled"}},
            "configPatches": [
                *filter_patches,
                access_log_patch,
                *(
                    {
                        "applyTo": "CLUSTER",
                        "match": {"context": "ANY"},
                        "patch": {"operation": "ADD", "value": to_dict(cluster)},
                    }
                    for cluster in _dropin_clusters(cfg)
                ),
            ],
        },
    }
    return (
        "# Istio: adds the extproc filters to workloads labelled extproc.io/ai-gateway=enabled,\n"
        "# with the sidecar running in the same pod (rendered by `extproc envoy --istio`).\n"
        + yaml.safe_dump(manifest, sort_keys=False, width=100)
    )
