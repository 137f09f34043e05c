# Two commands: `make run` serves the quickstart, `make test` runs the whole suite.
# Both create the virtualenv on first use; nothing else needs to be installed by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/quickstart.yaml
PYTEST_ARGS ?=

# Offline tokenizer files: use ../shared/tiktoken when it is there and the caller set nothing.
ifeq ($(origin TIKTOKEN_CACHE_DIR), undefined)
ifneq ($(wildcard ../shared/tiktoken),)
export TIKTOKEN_CACHE_DIR := $(abspath ../shared/tiktoken)
endif
endif

.PHONY: run test lint format check envoy envoy-files protos system-deps clean bench

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

run: $(BIN)/.installed
	$(BIN)/extproc up --config $(CONFIG)

test: $(BIN)/.installed system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: $(BIN)/.installed
	$(BIN)/extproc check --config $(CONFIG)

envoy: $(BIN)/.installed
	$(BIN)/extproc envoy --config $(CONFIG)

# The chat benchmark's load generator is wrk (Debian's package), installed when missing the way
# system-deps installs its tools; without it benchmarks.run falls back to its Python client
# and says so in the report.
bench: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "not found: wrk; installing Debian's package"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    wrk >/dev/null; \
	}
	$(BIN)/python -m benchmarks.run

# The Debian packages the tests run, each installed when its tool is missing: redis-server (the
# quota tests), prometheus (promtool and a real Prometheus: tests/test_compose.py) and
# docker-compose (validates docker-compose.yml; only when `docker compose` does not work).
system-deps:
	@missing=; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || \
	  missing="$$missing prometheus"; \
	docker compose version >/dev/null 2>&1 || docker-compose version >/dev/null 2>&1 || \
	  missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
	  echo "not found:$$missing; installing Debian's packages"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    $$missing >/dev/null; \
	fi
	@redis-server --version
	@promtool --version 2>&1 | head -n 1
	@docker compose version 2>/dev/null || docker-compose version --short

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# The rendered files under envoy/ (a test fails when they are out of date).
envoy-files: $(BIN)/.installed
	$(BIN)/extproc envoy -c examples/quickstart.yaml -o envoy/quickstart.yaml
	$(BIN)/extproc envoy --snippet -c examples/quickstart.yaml -o envoy/extproc-filter.yaml
	$(BIN)/extproc envoy --istio -c examples/quickstart.yaml -o envoy/istio-envoyfilter.yaml

# Our own gRPC APIs: protos/ compiled into extproc/ (a test fails when they are out of date).
protos: $(BIN)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. \
	  protos/extproc/admin/v1/quota.proto protos/extproc/admin/v1/config.proto \
	  protos/extproc/admin/v1/keys.proto
