"""The gateway's own gRPC admin API (stubs generated from protos/ into v1/)."""
