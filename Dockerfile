# syntax=docker/dockerfile:1
# lorafold: one base model, many LoRA adapters, OpenAI-compatible API.
#
#   docker build -t lorafold .                               # CPU (default)
#   docker build -t lorafold:cuda --build-arg VARIANT=cuda .  # NVIDIA GPU
#   docker run --gpus all ... lorafold:cuda                      # serves on the GPU, bf16
#
# The server's --device/--dtype default to auto: the CUDA image serves on the GPU in bf16 when
# one is visible (else on the CPU in fp32). Its runtime base gets gcc and the Python headers
# (build-steps.sh system), which Triton's first kernel launch needs.
# Every RUN step is deploy/docker/build-steps.sh, which CI also runs on the host.
# The default model (SmolLM2-135M-Instruct) is fetched and converted at build time, so a
# container starts serving in seconds and never touches the network at run time.
# Needs BuildKit (the default builder since Docker 23): it builds only the chosen base.

ARG VARIANT=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM python:3.11-slim AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
COPY deploy/docker/build-steps.sh /usr/local/bin/lorafold-build-steps
RUN lorafold-build-steps system

# ---- builder: virtual environment + converted model --------------------------------------
FROM base-${VARIANT} AS builder
ARG VARIANT
ARG TORCH_SPEC=torch==2.13.0
# Plain `torch` from PyPI on Linux is the multi-GB CUDA build: the CPU image takes the
# PyTorch CPU index; the CUDA image takes PyPI's default (CUDA) build unless told otherwise.
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=
# The CPU kernels are compiled here (the runtime image has no compiler) for a portable -march;
# the runtime stage sets the same value, which is part of the library's cache key. For arm64
# pass e.g. --build-arg CPU_MARCH=armv8.2-a.
ARG CPU_MARCH=x86-64-v3
ENV VENV=/opt/venv LORAFOLD_CACHE=/opt/lorafold/cache PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFOLD_CPU_MARCH=${CPU_MARCH}
WORKDIR /src
COPY deploy/docker/build-steps.sh /usr/local/bin/lorafold-build-steps
RUN lorafold-build-steps venv
RUN if [ "$VARIANT" = cuda ]; then index="$TORCH_INDEX_CUDA"; else index="$TORCH_INDEX_CPU"; fi; \
    TORCH_INDEX="$index" TORCH_SPEC="$TORCH_SPEC" lorafold-build-steps torch
COPY pyproject.toml README.md ./
COPY server server
COPY kernels kernels
COPY training training
COPY clients clients
RUN lorafold-build-steps app
RUN if [ "$VARIANT" = cpu ]; then lorafold-build-steps kernels; fi
RUN PRUNE_GGUF=1 lorafold-build-steps model check

# ---- runtime: venv + model only, non-root ------------------------------------------------
FROM base-${VARIANT} AS runtime
ARG CPU_MARCH=x86-64-v3
COPY deploy/docker/build-steps.sh /usr/local/bin/lorafold-build-steps
RUN APP_UID=10001 lorafold-build-steps user
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/lorafold/cache /opt/lorafold/cache
ENV PATH=/opt/venv/bin:$PATH \
    LORAFOLD_CACHE=/opt/lorafold/cache \
    LORAFOLD_CPU_MARCH=${CPU_MARCH} \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 10001:10001
WORKDIR /home/lorafold
EXPOSE 8000
VOLUME ["/data/adapters", "/data/state"]
# /health answers as soon as uvicorn is up; /ready (used by Kubernetes) waits for the engine.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
# Binding 0.0.0.0 needs a key: without LORAFOLD_API_KEYS / LORAFOLD_ADMIN_KEY (or --api-key /
# --admin-key) the server falls back to 127.0.0.1 and is unreachable from outside the container.
CMD ["lorafold", "serve", "--host", "0.0.0.0", "--adapter-root", "/data/adapters", "--state-dir", "/data/state", "--device", "auto"]
