#!/usr/bin/env bash
# Build the CUDA binary (`fer` with --features cuda,cudnn) on Linux x86-64, with or without a GPU:
#
#   just build-cuda                      # -> target/cuda/release/fer
#   FER_CUDA_FEATURES=cuda just build-cuda   # without cuDNN
#   FER_CUDA_VERSION=13.0 just build-cuda    # toolkit wheels of CUDA 13.0 (default: the newest)
#
# With `nvcc` on PATH (a CUDA toolkit installed by the user) it builds with that. Otherwise it
# installs NVIDIA's CUDA 13 toolkit wheels from PyPI into target/cuda-toolkit (no root, no driver
# needed; ~3 GB) and links against a stub libcuda.so.1 when the machine has no NVIDIA driver (the
# real driver library replaces it at run time). The recipe is ../shared/research/gpu_build.md;
# README "GPU" has the details and what a GPU machine needs at run time.
set -euo pipefail
cd "$(dirname "$0")/../.."
FEATURES=${FER_CUDA_FEATURES:-cuda,cudnn}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
# The toolkit must not be newer than the GPU machine's driver: the kernels travel as PTX, which a
# driver compiles only up to its own CUDA version (`nvidia-smi` prints it), and cudarc's bindings
# of a newer CUDA name driver functions an older driver lacks. FER_CUDA_VERSION=13.0 pins the wheels.
CUDA_VERSION=${FER_CUDA_VERSION:-}
TOOLKIT=${FER_CUDA_TOOLKIT:-$PWD/target/cuda-toolkit${CUDA_VERSION:+-$CUDA_VERSION}}
build() { cargo build --release -p fer-runner --features "$FEATURES"; }

if command -v nvcc >/dev/null && [ -z "${FER_PYPI_TOOLKIT:-}" ]; then
    echo "build-cuda: using the CUDA toolkit on PATH ($(command -v nvcc))"
    build
    echo "build-cuda: $CARGO_TARGET_DIR/release/fer"
    exit 0
fi

wheels=(nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl
        nvidia-cublas nvidia-cuda-nvrtc)
if [ -n "$CUDA_VERSION" ]; then
    wheels=("${wheels[@]/%/==$CUDA_VERSION.*}")
    # curand and cuDNN number their own releases; the oldest CUDA 13 curand fits every 13.x.
    wheels+=(nvidia-curand==10.4.0.*)
else
    wheels+=(nvidia-curand)
fi
[[ $FEATURES == *cudnn* ]] && wheels+=(nvidia-cudnn-cu13)
if [ ! -x "$TOOLKIT/nvidia/cu13/bin/nvcc" ] || { [[ $FEATURES == *cudnn* ]] && ! ls "$TOOLKIT"/nvidia/cudnn/lib/libcudnn.so.* >/dev/null 2>&1; }; then
    echo "build-cuda: installing the CUDA 13 toolkit wheels into $TOOLKIT"
    python3 -m pip install --quiet --target "$TOOLKIT" "${wheels[@]}"
fi
CUDA_ROOT="$TOOLKIT/nvidia/cu13"
chmod +x "$CUDA_ROOT"/bin/* "$CUDA_ROOT"/nvvm/bin/* 2>/dev/null || true
export CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
# No GPU to ask: sm_90 (H100 / H200) unless told otherwise. cudarc 0.19 knows CUDA up to 13.4 and
# refuses 13.5's version string; 13.4's bindings fit a 13.5 toolkit.
if [ -n "$CUDA_VERSION" ]; then
    cudarc_default=$(echo "$CUDA_VERSION" | awk -F. '{printf "%d%02d0", $1, $2}')
else
    cudarc_default=13040
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-$cudarc_default}

# Unversioned names for the linker.
LINK="$TOOLKIT/link"
mkdir -p "$LINK"
link() { local target; target=$(ls $2 2>/dev/null | head -1); [ -n "$target" ] && ln -sf "$target" "$LINK/$1"; }
link libnvrtc.so "$CUDA_ROOT/lib/libnvrtc.so.13*"
link libcublas.so "$CUDA_ROOT/lib/libcublas.so.13*"
link libcublasLt.so "$CUDA_ROOT/lib/libcublasLt.so.13*"
link libcudart.so "$CUDA_ROOT/lib/libcudart.so.13*"
link libcurand.so "$CUDA_ROOT/lib/libcurand.so.10*"
[[ $FEATURES == *cudnn* ]] && link libcudnn.so "$TOOLKIT/nvidia/cudnn/lib/libcudnn.so.9*"
# Lazy binding: a library function that the GPU machine's (older) cuDNN or cuBLAS lacks fails only
# if it is called, not when the program starts (Rust links with -z now by default).
export RUSTFLAGS="${RUSTFLAGS:-} -L $LINK -C link-arg=-Wl,-z,lazy"

have_driver() { ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 '; }
if ! have_driver && [ ! -e "$LINK/libcuda.so" ]; then
    # The first build compiles cudarc and fails to link without libcuda; its undefined driver
    # symbols then make the stub, and the second build only links.
    if ! build; then
        rlib=$(ls -t "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib | head -1)
        nm -u "$rlib" 2>/dev/null | awk '{print $NF}' | grep -E '^cu[A-Z]' | sort -u \
            | sed 's/.*/void &(void) {}/' > "$LINK/cuda_stub.c"
        echo "build-cuda: no NVIDIA driver here; linking against a stub libcuda.so.1 ($(wc -l < "$LINK/cuda_stub.c") symbols)"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
    fi
fi
build
echo "build-cuda: $CARGO_TARGET_DIR/release/fer"
echo "build-cuda: at run time it needs libcuda.so.1 (the driver), libcublas.so.13, libcublasLt.so.13, libcudart.so.13, libcurand.so.10, libnvrtc.so.13$([[ $FEATURES == *cudnn* ]] && echo ', libcudnn.so.9'): e.g. LD_LIBRARY_PATH=\$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')/nvidia/cu13/lib:..."
