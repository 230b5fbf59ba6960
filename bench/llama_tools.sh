#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-batched-bench from the source that the installed
# llama-cpp-python vendors, so that bench/serve_concurrency.py compares Lamina with the same llama.cpp.
#
#     bench/llama_tools.sh            # idempotent: prints the two binary paths when they are built
#
# Works offline apart from one `pip download` of the llama-cpp-python sdist (PyPI); pip's cache is
# used when it holds it. Output under build/llama-tools/ (build/ is git-ignored). Needs cmake and a
# C++ compiler (Debian: apt-get install cmake build-essential). Runs under nice, -j2 by default.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${LLAMA_TOOLS_DIR:-$ROOT/build/llama-tools}"
JOBS="${JOBS:-2}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}"
SRC="$OUT/llama_cpp_python-$VERSION"
BUILD="$OUT/build-$VERSION"
BIN="$BUILD/bin"

if [[ -x "$BIN/llama-server" && -x "$BIN/llama-batched-bench" ]]; then
    echo "$BIN/llama-server"
    echo "$BIN/llama-batched-bench"
    exit 0
fi

command -v cmake >/dev/null || { echo "cmake is missing: apt-get install cmake" >&2; exit 1; }
command -v c++ >/dev/null || { echo "a C++ compiler is missing: apt-get install build-essential" >&2; exit 1; }

mkdir -p "$OUT"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    [[ -f "$OUT/sdist/llama_cpp_python-$VERSION.tar.gz" ]] ||
        "$PY" -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$OUT/sdist" >&2
    tar -xzf "$OUT/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$OUT"
fi

# Release, CPU only, tuned for this machine like a local llama-cpp-python build. Offline: no curl
# (deprecated in newer trees, a warning there), no OpenSSL, and no download of the server's prebuilt
# web UI from Hugging Face (the server then runs without its UI, which the benchmark does not use).
nice -n 10 cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_CCACHE=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON >&2
nice -n 10 cmake --build "$BUILD" --target llama-server llama-batched-bench -j "$JOBS" >&2

echo "$BIN/llama-server"
echo "$BIN/llama-batched-bench"
