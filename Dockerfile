# loraplex on an NVIDIA GPU host:
#   docker build -t loraplex .
#   docker run --gpus all --stop-timeout 40 -p 50051:50051 -p 9400:9400 -p 8000:8000 \
#     -v /srv/models/Llama-3.1-8B-Instruct:/models/base:ro -v /srv/adapters:/adapters loraplex
# The base model is a local Hugging Face directory mounted at /models/base (nothing is
# downloaded); PEFT adapters live under /adapters (writable: UploadAdapter stores there).
# Options: append flags to the command, or set LORAPLEX_<NAME> variables (see README).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    PATH=/opt/loraplex/bin:$PATH

# Ubuntu 24.04 ships Python 3.12; a venv keeps pip away from the system packages (PEP 668).
# Unpinned on purpose: the distribution's security updates of python3 should come in.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/loraplex

WORKDIR /src
# torch first, in its own layer: a source change does not download it again. From PyPI it
# is the CUDA build on Linux x86_64 and brings its own CUDA libraries; the image needs only
# the host's driver (--gpus all).
# constraints.txt pins the CPU test set-up; triton is left out here because the CUDA build of
# torch pins its own triton.
COPY constraints.txt ./
RUN grep -v '^triton' constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt torch
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
RUN pip install -c /tmp/constraints.txt '.[server]' && rm -rf /src /tmp/constraints.txt

RUN groupadd --gid 10001 loraplex \
    && useradd --create-home --uid 10001 --gid 10001 loraplex \
    && mkdir -p /models /adapters \
    && chown 10001:10001 /adapters
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/loraplex

VOLUME ["/models", "/adapters"]
# gRPC, Prometheus /metrics, the OpenAI-compatible HTTP API
EXPOSE 50051 9400 8000

# Readiness through grpc.health.v1: unhealthy while loading, warming up, stalled or draining.
# It asks 127.0.0.1:$LORAPLEX_PORT (default 50051); no torch is imported for it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["loraplex", "healthcheck"]

# SIGTERM drains: in-flight streams get --drain-timeout (30 s) to finish; give docker stop
# longer than that (--stop-timeout 40).
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraplex"]
CMD ["serve", "--host", "0.0.0.0", "--model", "/models/base", "--adapter-root", "/adapters"]
