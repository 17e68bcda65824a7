# ddtool for CI: a CPU image by default; the GPU image is the same file with another torch index:
#   docker build -t ddtool:cpu .
#   docker build -t ddtool:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD:/work" ddtool:cuda distill ... --device cuda
# The CUDA wheels bring their own CUDA runtime; the host needs only the NVIDIA driver and the
# NVIDIA container toolkit.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first: a change to ddtool's code rebuilds only the second, small layer.
COPY docker/install.sh docker/requirements.txt ./docker/
RUN TORCH_INDEX_URL="$TORCH_INDEX_URL" TORCH_VERSION="$TORCH_VERSION" sh docker/install.sh /opt/venv deps
COPY pyproject.toml README.md ./
COPY ddtool ./ddtool
RUN sh docker/install.sh /opt/venv ddtool

# The final stage: the venv and nothing that built it (no compilers, no pip, no caches, no sources).
FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 ddtool && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin ddtool
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["ddtool"]
CMD ["--help"]
