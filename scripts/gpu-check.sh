#!/bin/bash
# GPU check of the worker, run on the GPU machine: the CUDA tests, then worker-bench on the
# GPU (padded-batch decode attention, then the per-sequence baseline) and on the same
# machine's CPU, so every figure has its baseline from the same call. Results go to $OUT
# (default ./gpu-check-out).
#
# Prepare on the build machine (scripts/build-cuda.sh prints the paths):
#   mkdir -p .device && cp <worker-bench> .device/worker-bench && cp <cuda test binary> .device/cuda-tests
#   strip .device/*; (cd .device && tar cJf bins.tar.xz worker-bench cuda-tests && rm worker-bench cuda-tests)
#   cp scripts/gpu-check.sh .device/run.sh        # .device/ is what travels to the GPU machine
# On the GPU machine: bash .device/run.sh
set -u
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
if [ -f bins.tar.xz ]; then tar xJf bins.tar.xz; fi
chmod +x worker-bench cuda-tests
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc; grep -m1 "model name" /proc/cpuinfo
# CUDA runtime libraries (cudart, cublas, curand, nvrtc) from the image's toolkit and wheels
LIBS=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for root in site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]:
    for pat in ("libcudart.so*", "libcublas*.so*", "libcurand.so*", "libnvrtc*.so*"):
        for f in glob.glob(os.path.join(root, "**", pat), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$LIBS:/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd ./cuda-tests | grep -E "not found|cuda|cublas|curand|nvrtc" || true
echo "=== cuda tests"
timeout 120 ./cuda-tests --test-threads 1 2>&1 | tee "$OUT/cuda-tests.log"
echo "=== worker-bench cuda"
timeout 150 ./worker-bench --synthetic smollm2-135m --device cuda --prompts 512,2048 --streams 1,4,8,16 --decode-tokens 64 --rounds 2 > "$OUT/bench-cuda.json" 2> >(tee "$OUT/bench-cuda.log" >&2)
echo "=== worker-bench cuda, per-sequence decode attention (baseline, same machine)"
SWITCHYARD_BATCHED_DECODE=0 timeout 100 ./worker-bench --synthetic smollm2-135m --device cuda --prompts 512 --streams 1,4,8,16 --decode-tokens 64 --rounds 1 > "$OUT/bench-cuda-perseq.json" 2> >(tee "$OUT/bench-cuda-perseq.log" >&2)
echo "=== worker-bench cpu (same machine)"
timeout 90 ./worker-bench --synthetic smollm2-135m --device cpu --prompts 512 --streams 1,4 --decode-tokens 32 --rounds 1 > "$OUT/bench-cpu.json" 2> >(tee "$OUT/bench-cpu.log" >&2)
echo done
