"""Building and reading ext_proc protocol messages (Envoy's generated stubs from xds-protos)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2, text_format

from .contract import (
    CLUSTER_ATTRIBUTE,
    CODE_DETAILS_ATTRIBUTE,
    FROM_BACKEND,
    HOST_ATTRIBUTE,
    METADATA_NAMESPACE,
    backend_from_cluster,
)

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Envoy sends header values in raw_value (bytes); value is empty unless an old runtime flag
# is flipped. Read both so the sidecar works with either.


def header_dict(header_map: Any) -> dict[str, str]:
    """Lower-cased name -> value; repeated headers are joined with ',' as HTTP allows."""
    out: dict[str, str] = {}
    for h in header_map.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def header_option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode("utf-8")),
        append_action=_OVERWRITE,
    )


def common(
    set_headers: Mapping[str, str] | None = None,
    remove_headers: Iterable[str] = (),
    body: bytes | None = None,
    clear_route_cache: bool = False,
) -> pb.CommonResponse:
    resp = pb.CommonResponse(clear_route_cache=clear_route_cache)
    if set_headers:
        resp.header_mutation.set_headers.extend(header_option(k, v) for k, v in set_headers.items())
    remove = list(remove_headers)
    if remove:
        resp.header_mutation.remove_headers.extend(remove)
    if body is not None:
        resp.body_mutation.body = body
    return resp


def request_headers_response(
    common_response: pb.CommonResponse | None = None,
    mode_override: ProcessingMode | None = None,
    dynamic_metadata: Mapping[str, Any] | None = None,
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common_response))
    return _finish(resp, mode_override, dynamic_metadata)


def response_headers_response(
    common_response: pb.CommonResponse | None = None,
    mode_override: ProcessingMode | None = None,
    dynamic_metadata: Mapping[str, Any] | None = None,
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common_response))
    return _finish(resp, mode_override, dynamic_metadata)


def request_body_response(
    common_response: pb.CommonResponse | None = None,
    dynamic_metadata: Mapping[str, Any] | None = None,
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common_response))
    return _finish(resp, None, dynamic_metadata)


def response_body_response(
    common_response: pb.CommonResponse | None = None,
    dynamic_metadata: Mapping[str, Any] | None = None,
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(response_body=pb.BodyResponse(response=common_response))
    return _finish(resp, None, dynamic_metadata)


def immediate_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str] | None = None,
    details: str = "",
    content_type: str = "application/json",
) -> pb.ProcessingResponse:
    imm = pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status), body=body, details=details
    )
    all_headers = {"content-type": content_type, **(headers or {})}
    imm.headers.set_headers.extend(header_option(k, v) for k, v in all_headers.items())
    return pb.ProcessingResponse(immediate_response=imm)


def _finish(
    resp: pb.ProcessingResponse,
    mode_override: ProcessingMode | None,
    dynamic_metadata: Mapping[str, Any] | None,
) -> pb.ProcessingResponse:
    if mode_override is not None:
        resp.mode_override.CopyFrom(mode_override)
    if dynamic_metadata:
        resp.dynamic_metadata.CopyFrom(to_struct(dynamic_metadata))
    return resp


def to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """`data` as a Struct; what Struct.update does, in about half its time (it runs on every
    request's hand-over): plain JSON values only."""
    return _fill(struct_pb2.Struct(), data)


def _fill(struct: struct_pb2.Struct, data: Mapping[str, Any]) -> struct_pb2.Struct:
    fields = struct.fields
    for key, value in data.items():
        _set_value(fields[key], value)
    return struct


def _set_value(target: struct_pb2.Value, value: Any) -> None:
    kind = type(value)
    if kind is str:
        target.string_value = value
    elif kind is bool:
        target.bool_value = value
    elif kind is int or kind is float:
        target.number_value = value
    elif value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, str):  # a StrEnum
        target.string_value = str(value)
    elif isinstance(value, int | float):  # an IntEnum
        target.number_value = float(value)
    elif isinstance(value, Mapping):
        target.struct_value.SetInParent()  # an empty one is still one
        _fill(target.struct_value, value)
    elif isinstance(value, list | tuple):
        target.list_value.SetInParent()
        values = target.list_value.values
        for item in value:
            _set_value(values.add(), item)
    else:
        raise ValueError(f"not a JSON value: {kind.__name__}")


def struct_dict(struct: struct_pb2.Struct, keys: Collection[str] | None = None) -> dict[str, Any]:
    """A Struct as plain Python values (numbers stay floats), several times faster than
    json_format.MessageToDict, which goes through its generic message printer. `keys`: only
    those (a reader of the request's metadata skips what it does not read)."""
    fields = struct.fields
    if keys is None:
        return {key: _plain(value) for key, value in fields.items()}
    return {key: _plain(fields[key]) for key in keys if key in fields}


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    return None


def struct_value(struct: struct_pb2.Struct, *path: str) -> Any:
    """A value inside a Struct (e.g. ProcessingRequest.attributes), or None."""
    cur: Any = struct
    for part in path:
        if isinstance(cur, struct_pb2.Struct) and part in cur.fields:
            cur = cur[part]
        else:
            return None
    return cur


# A mode override replaces the whole mode for the rest of the stream, so every phase still to
# come is spelled out (DEFAULT would mean "send" for headers).
STREAMED_RESPONSE = ProcessingMode(
    response_header_mode=ProcessingMode.SEND,
    response_body_mode=ProcessingMode.STREAMED,
    response_trailer_mode=ProcessingMode.SKIP,
)
# The stream observer follows the body instead: this stage lets it pass without waiting.
OBSERVED_RESPONSE = ProcessingMode(
    response_header_mode=ProcessingMode.SEND,
    response_body_mode=ProcessingMode.NONE,
    response_trailer_mode=ProcessingMode.SKIP,
)
UPSTREAM_REWRITE_BODY = ProcessingMode(
    request_header_mode=ProcessingMode.SEND,
    request_body_mode=ProcessingMode.BUFFERED,
    request_trailer_mode=ProcessingMode.SKIP,
    response_header_mode=ProcessingMode.SKIP,
    response_body_mode=ProcessingMode.NONE,
    response_trailer_mode=ProcessingMode.SKIP,
)


def answering_backend(req: Any) -> str | None:
    """The backend that answered: a backend's cluster says it by its name; behind a pooled
    model's cluster, the host's metadata does (parsed only then: it costs more)."""
    cluster = _attribute(req, CLUSTER_ATTRIBUTE)
    backend = backend_from_cluster(cluster) if cluster else None
    return backend if backend is not None else host_backend(req)


def from_backend(req: Any) -> bool:
    """The answer is the backend's, not Envoy's own reply or a stage's immediate response
    (an Envoy that does not say is taken at its backend's word)."""
    details = _attribute(req, CODE_DETAILS_ATTRIBUTE)
    return details is None or details == FROM_BACKEND


def host_backend(req: Any) -> str | None:
    # Envoy renders this attribute as the text form of an envoy.config.core.v3.Metadata.
    text = _attribute(req, HOST_ATTRIBUTE)
    if not text:
        return None
    try:
        metadata = text_format.Parse(text, base_pb2.Metadata())
    except text_format.ParseError:
        return None
    struct = metadata.filter_metadata.get(METADATA_NAMESPACE)
    value = struct_value(struct, "backend") if struct is not None else None
    return value if isinstance(value, str) else None


def _attribute(req: Any, name: str) -> str | None:
    # Envoy puts attributes under the filter's name, e.g. attributes["envoy.filters.http.ext_proc"]
    for struct in req.attributes.values():
        value = struct_value(struct, name)
        if isinstance(value, str):
            return value
    return None


_PASS = {
    "request_headers": lambda: request_headers_response(),
    "response_headers": lambda: response_headers_response(),
    "request_body": lambda: request_body_response(),
    "response_body": lambda: response_body_response(),
}


def passthrough(kind: str | None) -> pb.ProcessingResponse:
    """The answer that changes nothing, for any message kind."""
    if kind in _PASS:
        return _PASS[kind]()
    if kind == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
