# syntax=docker/dockerfile:1.7
# dvd-serve GPU image: vLLM's official CUDA image (vLLM 0.33.0 with its own CUDA torch, Python 3.12) plus dvd-serve
# and its runtime requirements, pinned in gpu-requirements.txt next to this file.
#
# Build from the repository root with BuildKit (gpu.Dockerfile.dockerignore next to this file trims the context):
#   docker build -f deploy/docker/gpu.Dockerfile -t registry.example.com/dvd-serve/dvd-serve:0.1.0-cuda .

# vLLM's CUDA image; its vLLM must satisfy pyproject's `gpu` extra (vllm>=0.33,<0.34). Append @sha256:<digest> to
# freeze it byte for byte.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
# Builds the dvd-serve wheel only; its Python minor version must match the vLLM image's (3.12).
ARG WHEEL_BUILD_IMAGE=python:3.12.12-slim-bookworm

FROM ${WHEEL_BUILD_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The build backend pyproject.toml asks for, pinned.
RUN pip install --no-cache-dir "setuptools==80.9.0" "wheel==0.48.0"
COPY pyproject.toml setup.py README.md ./
COPY common/ common/
COPY server/ server/
COPY vision_worker/ vision_worker/
COPY lm_worker/ lm_worker/
COPY router/ router/
COPY proto/ proto/
COPY loadtests/ loadtests/
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${VLLM_IMAGE} AS runtime
# Numeric id of the non-root user the container runs as (the Helm chart's podSecurityContext uses the same).
ARG APP_UID=10001
# Dependencies first: this layer is reused until gpu-requirements.txt changes. The pins include the base image's
# vllm and torch, so installing them can never replace the CUDA stack the image was built with.
COPY deploy/docker/gpu-requirements.txt /tmp/gpu-requirements.txt
RUN uv pip install --system --no-cache -r /tmp/gpu-requirements.txt \
    && rm /tmp/gpu-requirements.txt
# Then dvd-serve itself; its requirements are already in place.
COPY --from=wheel /wheels /tmp/wheels
RUN uv pip install --system --no-cache --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && groupadd --gid "${APP_UID}" dvd \
    && useradd --uid "${APP_UID}" --gid "${APP_UID}" --create-home --home-dir /home/dvd --shell /bin/bash dvd
ENV HOME=/home/dvd \
    PYTHONUNBUFFERED=1
USER ${APP_UID}:${APP_UID}
WORKDIR /home/dvd
EXPOSE 8000
ENTRYPOINT ["dvd-serve"]
CMD ["--help"]
