"""Tools for developing, testing and demonstrating the gateway; none of them is the gateway.

They ship with extproc so that `make run`, the tests and the benchmarks need nothing else,
but no request a gateway serves in production passes through them.
"""
