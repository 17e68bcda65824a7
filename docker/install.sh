#!/bin/sh
# The image's install steps, in one place: the Dockerfile runs this, and tests/test_docker.py
# runs it in a fresh venv, so what CI checks is what the image does.
#
#   sh docker/install.sh VENV_DIR           everything (what the test runs)
#   sh docker/install.sh VENV_DIR deps      torch and the pinned requirements: the Dockerfile's first
#                                           layer, rebuilt only when docker/ changes
#   sh docker/install.sh VENV_DIR ddtool    ddtool itself: the second layer, rebuilt in seconds
#
# TORCH_INDEX_URL picks the torch build: the CPU index by default in the Dockerfile, a CUDA one
# (e.g. https://download.pytorch.org/whl/cu126) for the GPU image; unset, pip's own configuration
# decides. TORCH_VERSION pins torch.
#
# What running ddtool does not need is removed (each removal checked by distilling, exporting
# ONNX, TorchScript and .pt2, predicting and plotting in the trimmed venv): torch's C++ test
# binaries, headers and CMake files (torch.compile needs a C++ compiler, which the image has none
# of anyway), every package's tests, and at the end pip and setuptools. Byte code stays: without
# it each ddtool command spends about 1.8 s more CPU compiling imports (README, Docker).
set -eu
usage="usage: install.sh VENV_DIR [deps|ddtool]"
venv=${1:?$usage}
step=${2:-all}
case $step in all | deps | ddtool) ;; *) echo "$usage" >&2; exit 2 ;; esac
src=$(cd "$(dirname "$0")/.." && pwd)
torch_version=${TORCH_VERSION:-2.13.0}
pip="$venv/bin/python -m pip --disable-pip-version-check"

if [ "$step" != ddtool ]; then
    python3 -m venv "$venv"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        $pip install --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
    else
        $pip install "torch==$torch_version"
    fi
    $pip install -r "$src/docker/requirements.txt"
    site=$(echo "$venv"/lib/python3*/site-packages)
    rm -rf "$site/torch/test" "$site/torch/include" "$site/torch/share" "$site/onnx/backend/test" \
        "$site"/torch/lib/*_test.so "$site/torch/lib/libaoti_custom_ops.so" "$site/torch/lib/libbackend_with_compiler.so"
    find "$site/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +
    find "$site" -depth -type d -name tests -exec rm -rf {} +
fi
if [ "$step" != deps ]; then
    $pip install --no-deps "$src"
    $pip uninstall --quiet --yes pip setuptools
    "$venv/bin/ddtool" --version
fi
