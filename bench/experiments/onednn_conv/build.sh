#!/usr/bin/env bash
# Builds libldconv.so (oneDNN convolutions as XLA FFI handlers) for the experiment in this folder.
#   bash bench/experiments/onednn_conv/build.sh
# Fetches the oneDNN 3.2 wheels from PyPI (onednn-cpu-gomp, onednn-devel-cpu-gomp: library + headers) into
# build/, unpacks them there and compiles with g++ against JAX's FFI headers. Needs g++ and the project's .venv python.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../../../.venv/bin/python}"
build="$here/build"
version=2023.2.0
mkdir -p "$build/wheels" "$build/onednn"
if [ ! -f "$build/onednn/.unpacked-$version" ]; then
  "$python" -m pip download --quiet --no-deps -d "$build/wheels" \
    "onednn-cpu-gomp==$version" "onednn-devel-cpu-gomp==$version"
  for wheel in "$build"/wheels/onednn*"$version"*.whl; do
    "$python" -m zipfile -e "$wheel" "$build/onednn"
  done
  touch "$build/onednn/.unpacked-$version"
fi
include="$build/onednn/onednn_devel_cpu_gomp-$version.data/data/include"
lib="$build/onednn/onednn_cpu_gomp-$version.data/data/lib"
ffi_include="$("$python" -c 'import jax.ffi; print(jax.ffi.include_dir())')"
g++ -O2 -std=c++17 -shared -fPIC -I"$ffi_include" -I"$include" "$here/onednn_conv.cc" -o "$build/libldconv.so" \
  -L"$lib" -l:libdnnl.so.3 -Wl,-rpath,"$lib"
echo "built $build/libldconv.so"
