"""The committed gRPC stubs are exactly what grpcio-tools generates from protos/ today."""

from __future__ import annotations

from grpc_tools import protoc

from .conftest import REPO

PROTOS = [
    "extproc/admin/v1/quota.proto",
    "extproc/admin/v1/config.proto",
    "extproc/admin/v1/keys.proto",
]


def test_generated_stubs_match_protos(tmp_path):
    for proto in PROTOS:
        args = [
            "protoc",
            f"-I{REPO / 'protos'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(REPO / "protos" / proto),
        ]
        assert protoc.main(args) == 0
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            generated = (tmp_path / f"{stem}{suffix}").read_text()
            committed = (REPO / f"{stem}{suffix}").read_text()
            assert committed == generated, f"{stem}{suffix} is stale: run `make protos`"
