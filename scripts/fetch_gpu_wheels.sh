#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on a GPU machine without network into .gpu-wheels/
# (ignored by git; carry it with the checkout): bitsandbytes for manylinux x86_64 (about 41 MiB, one
# py3-none wheel for every Python), and setuptools, the build backend of `pip install --no-deps -e .` where
# the GPU machine's Python has none recent enough.
#
#   scripts/fetch_gpu_wheels.sh [DEST]      DEST defaults to .gpu-wheels in the checkout
#
# BITSANDBYTES_VERSION (default 0.50.2, the dev environment's; pyproject.toml declares >=0.50.0) and
# SETUPTOOLS_VERSION (default 77.0.1, the floor `tox -e build-floor` builds with) pick other versions.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.gpu-wheels}"
python="${PYTHON:-$(command -v python || command -v python3)}"
bitsandbytes="${BITSANDBYTES_VERSION:-0.50.2}"
setuptools="${SETUPTOOLS_VERSION:-77.0.1}"

mkdir -p "$dest"
"$python" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_24_x86_64 --python-version 3.12 --implementation py \
    "bitsandbytes==$bitsandbytes" -d "$dest"
"$python" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    "setuptools==$setuptools" -d "$dest"
echo "fetched into $dest:"
ls -l "$dest"
