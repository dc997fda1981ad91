#!/usr/bin/env bash
# llama-cpp-python into the active venv, for the GGUF parity tests (tests/test_export.py): llama.cpp itself runs
# our exported model.gguf. No wheel is published for this platform, so it is built from its source distribution
# on PyPI: only ggml and libllama (no server, tools, examples, multimodal or GPU backends), ~10 minutes on 2
# cores. The build uses -march=native (the speed llama.cpp users get) but never ggml's AMX backend: on Intel
# CPUs with AMX its q8_0 matmul segfaults (llama.cpp #20824), so -mno-amx-* keeps it out of the build on every
# machine (GCC honours an explicit -mno-* whatever -march=native turns on). The wheel is cached outside the repo,
# keyed by the version, this CPU's instruction set and the build options, so the build runs once per machine and
# a wheel built with other options is never reused:
#     bash .ci/llama_cpp.sh            # the cache is ~/.cache/nanoforge/wheels, or $NANOFORGE_WHEELS
set -euo pipefail

VERSION=0.3.36
NO_AMX=""
[ "$(uname -m)" = x86_64 ] && NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF \
'-DCMAKE_C_FLAGS=$NO_AMX' '-DCMAKE_CXX_FLAGS=$NO_AMX'"
KEY="$( (grep -m1 '^flags' /proc/cpuinfo; echo "$CMAKE_ARGS") | sha256sum | cut -c1-12)"
CACHE="${NANOFORGE_WHEELS:-$HOME/.cache/nanoforge/wheels}/llama_cpp_python-$VERSION-$KEY"

if ! compgen -G "$CACHE/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    echo "building llama-cpp-python $VERSION from source into $CACHE (once per machine, ~10 minutes on 2 cores)"
    rm -rf "$CACHE.tmp"
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        pip wheel -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python --wheel-dir "$CACHE.tmp" \
        "llama-cpp-python==$VERSION"
    rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"  # only a finished build is ever found in the cache
fi
# its Python dependencies (numpy, jinja2, diskcache, typing-extensions) come from PyPI as usual
pip install -q --disable-pip-version-check "$CACHE"/llama_cpp_python-$VERSION-*.whl
