#!/usr/bin/env bash
# Builds the worker with the `cuda` feature (release: switchyard-worker, worker-bench and the
# CUDA test binary) for a GPU machine.
#
# With a CUDA toolkit installed (nvcc on PATH, libcuda available) this is a plain cargo build.
# Without one — the 2-core build machines, which have no GPU and no toolkit — it fetches
# NVIDIA's compiler and runtime headers from PyPI (no protoc-style system install needed) and
# links against stub libraries carrying the sonames of the driver and cuBLAS/cuRAND/NVRTC;
# the GPU machine's real libraries are loaded at run time. The kernels are compiled for one
# architecture, CUDA_COMPUTE_CAP (default 90: H100/H200); expect ~40 min of nvcc on 2 cores
# the first time (target dir: CARGO_TARGET_DIR, default target-cuda).
#
#   scripts/build-cuda.sh            # then copy the printed binaries to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
# The workspace default is already the portable x86-64-v3 baseline (.cargo/config.toml).
export RUSTFLAGS=${RUSTFLAGS:--C target-cpu=x86-64-v3}

if ! command -v nvcc >/dev/null; then
    CUDA_MINOR=${CUDA_MINOR:-13.0}
    root=${CUDA_PIP_ROOT:-$HOME/.cache/switchyard/cuda-$CUDA_MINOR}
    cu=$root/nvidia/cu13
    if [ ! -x "$cu/bin/nvcc" ]; then
        mkdir -p "$root/wheels"
        python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$root/wheels" \
            "nvidia-cuda-nvcc==$CUDA_MINOR.*" "nvidia-cuda-runtime==$CUDA_MINOR.*" \
            "nvidia-cuda-cccl==$CUDA_MINOR.*" "nvidia-cuda-crt==$CUDA_MINOR.*" \
            "nvidia-nvvm==$CUDA_MINOR.*"
        for w in "$root"/wheels/*.whl; do unzip -q -o "$w" -d "$root"; done
        chmod +x "$cu"/bin/* "$cu"/nvvm/bin/*
        ln -sf libcudart.so.13 "$cu/lib/libcudart.so"
    fi
    # Stubs: the symbols candle/cudarc import from the driver and CUDA libraries, under the
    # sonames the GPU machine resolves at run time.
    stubs=$root/stubs
    mkdir -p "$stubs"
    stub() { # lib soname symbols...
        local lib=$1 so=$2
        shift 2
        printf 'void %s(void){}\n' "$@" "switchyard_stub_$lib" >"$stubs/$lib.c"
        gcc -shared -fPIC -o "$stubs/lib$lib.so" -Wl,-soname,"$so" "$stubs/$lib.c"
    }
    stub cuda libcuda.so.1 cuCtxDestroy_v2 cuCtxGetCurrent cuCtxSetCurrent cuDeviceGet \
        cuDeviceGetAttribute cuDevicePrimaryCtxRelease_v2 cuDevicePrimaryCtxRetain \
        cuEventCreate cuEventDestroy_v2 cuEventRecord cuGetErrorString cuInit cuLaunchKernel \
        cuMemAllocAsync cuMemAlloc_v2 cuMemFreeAsync cuMemFree_v2 cuMemcpyDtoDAsync_v2 \
        cuMemcpyDtoHAsync_v2 cuMemcpyHtoDAsync_v2 cuMemcpyPeerAsync cuMemsetD8Async \
        cuModuleGetFunction cuModuleLoad cuModuleLoadData cuModuleUnload cuStreamDestroy_v2 \
        cuStreamIsCapturing cuStreamSynchronize cuStreamWaitEvent
    stub cublas libcublas.so.13 cublasCreate_v2 cublasDestroy_v2 cublasDgemmStridedBatched \
        cublasGemmStridedBatchedEx cublasSetStream_v2
    stub cublasLt libcublasLt.so.13
    stub curand libcurand.so.10 curandCreateGenerator curandDestroyGenerator \
        curandGenerateUniform curandGenerateUniformDouble curandSetPseudoRandomGeneratorSeed \
        curandSetStream
    stub nvrtc libnvrtc.so.13
    export CUDA_HOME=$cu CUDA_PATH=$cu PATH=$cu/bin:$PATH CUDARC_CUDA_VERSION=13000
    export RUSTFLAGS="$RUSTFLAGS -L $cu/lib"
    # A symbol missing from the stubs fails the link with its name: add it above.
    export LIBRARY_PATH=$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
fi

cargo build --release -p pool-worker --features cuda
cargo test --release -p pool-worker --features cuda --no-run 2>&1 | tee /dev/stderr |
    sed -n 's/.*tests\/cuda.rs (\(.*\))/CUDA tests: \1/p'
echo "worker:       $CARGO_TARGET_DIR/release/switchyard-worker"
echo "worker-bench: $CARGO_TARGET_DIR/release/worker-bench"
echo "On the GPU machine: LD_LIBRARY_PATH must reach libcudart.so.13, libcublas.so.13 and"
echo "libcurand.so.10 (the CUDA toolkit's lib64, or the nvidia-* wheels' nvidia/cu13/lib)."
