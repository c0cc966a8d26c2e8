# facetwin server image — DRAFT (issue 2). The GPU image (pinned NVIDIA TensorRT base, engines built on first start)
# is issue 4; this one serves bundles with the embedded ONNX Runtime CPU backend and runs anywhere.
#   docker build -t facetwin .
#   docker run -p 50051:50051 -v $PWD/out/models:/models:ro facetwin
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FACETWIN_MODEL_DIR=/models \
    FACETWIN_ADDRESS=0.0.0.0:50051

WORKDIR /opt/facetwin
COPY pyproject.toml README.md ./
COPY proto proto
COPY client client
COPY server server
COPY training training
RUN pip install ".[server]" && useradd --create-home --uid 10001 facetwin

USER facetwin
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["facetwin-server", "healthcheck", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["facetwin-server", "serve"]
