#!/bin/sh
# The image's install steps, in one place: the Dockerfile runs this, and tests/test_docker.py
# runs it in a fresh venv, so what CI checks is what the image does.
#
#   sh docker/install.sh VENV_DIR
#
# TORCH_INDEX_URL picks the torch build: the CPU index by default in the Dockerfile, a CUDA one
# (e.g. https://download.pytorch.org/whl/cu126) for the GPU image; unset, pip's own configuration
# decides. TORCH_VERSION pins torch.
set -eu
venv=${1:?usage: install.sh VENV_DIR}
src=$(cd "$(dirname "$0")/.." && pwd)
torch_version=${TORCH_VERSION:-2.13.0}

python3 -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    $pip install --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
else
    $pip install "torch==$torch_version"
fi
$pip install -r "$src/docker/requirements.txt"
$pip install --no-deps "$src"
"$venv/bin/ddtool" --version
