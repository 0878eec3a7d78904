#!/usr/bin/env bash
# make setup: builds .venv with the pinned stack (constraints.txt), Horovod built with Gloo against
# the venv's TensorFlow, the project in editable mode, and Debian's Fashion-MNIST. Idempotent: every
# step checks first and skips what is already in place, so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

GPU="${GPU:-0}"
VENV=.venv
PY="$VENV/bin/python"
PIP=(pip_quiet "$PY" -m pip install --disable-pip-version-check -q -c constraints.txt)
# pip without the machine-specific "Location ... is ignored" chatter of local mirrors.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %b\n' "$*" >&2; exit 1; }

# 1. Java 17 (Spark 3.5 runs on 8/11/17; the stack was measured on 17).
command -v java >/dev/null || die "Java 17 is required: apt-get install openjdk-17-jre-headless"
JAVA_MAJOR=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
[ "$JAVA_MAJOR" = "17" ] || die "Java 17 is required, found Java ${JAVA_MAJOR:-unknown}: apt-get install openjdk-17-jre-headless"
say "java $JAVA_MAJOR ok"

# 2. GPU builds: Horovod's NCCL build compiles CUDA kernels, so find the CUDA toolkit (nvcc and its headers) before
# creating or downloading anything. An explicit HOROVOD_CUDA_HOME wins, then CUDA_HOME, /usr/local/cuda, nvcc on PATH.
# NCCL comes from the nvidia-nccl-cu12 wheel that tensorflow[and-cuda] installs (the NCCL TensorFlow itself loads),
# unless HOROVOD_NCCL_HOME or HOROVOD_NCCL_INCLUDE/HOROVOD_NCCL_LIB name another one.
cuda_home_ok() { [ -n "$1" ] && [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ]; }
if [ "$GPU" = "1" ]; then
  if [ -n "${HOROVOD_CUDA_HOME:-}" ]; then
    cuda_home_ok "$HOROVOD_CUDA_HOME" || die "GPU=1: HOROVOD_CUDA_HOME=$HOROVOD_CUDA_HOME has no bin/nvcc and include/cuda_runtime.h"
  else
    NVCC_ON_PATH=$(command -v nvcc || true)
    for c in "${CUDA_HOME:-}" /usr/local/cuda "${NVCC_ON_PATH:+$(dirname "$(readlink -f "$NVCC_ON_PATH")")/..}"; do
      if cuda_home_ok "$c"; then HOROVOD_CUDA_HOME=$(cd "$c" && pwd -P); break; fi
    done
    [ -n "${HOROVOD_CUDA_HOME:-}" ] || die "GPU=1 needs a CUDA toolkit (nvcc and its headers; CUDA 12 matches TensorFlow 2.16's 12.3) to build Horovod with NCCL: install it, or set HOROVOD_CUDA_HOME to its folder"
  fi
  export HOROVOD_CUDA_HOME
  say "GPU build: CUDA toolkit at $HOROVOD_CUDA_HOME ($("$HOROVOD_CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/release \1/p'))"
fi

# 3. Python 3.11 virtual environment.
if [ ! -x "$PY" ]; then
  PY311=$(command -v python3.11 || true)
  [ -n "$PY311" ] || die "Python 3.11 is required (python3.11 not found on PATH)"
  say "creating $VENV with $PY311"
  "$PY311" -m venv "$VENV"
  pip_quiet "$PY" -m pip install --disable-pip-version-check -q --upgrade "pip<25" wheel setuptools
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "$VENV is not Python 3.11: remove it and run make setup again"

# 4. TensorFlow + tf-keras first: Horovod compiles against the TensorFlow it finds. GPU=1 also needs the CUDA
# libraries TensorFlow loads (the [and-cuda] extra), which a CPU set-up of the same .venv lacks.
if [ "$GPU" = "1" ]; then TF_REQ="tensorflow[and-cuda]"; TF_CHECK="import tensorflow, tf_keras, nvidia.cudnn"
else TF_REQ="tensorflow"; TF_CHECK="import tensorflow, tf_keras"; fi
if ! "$PY" -c "$TF_CHECK" >/dev/null 2>&1; then
  say "installing $TF_REQ and tf-keras (pinned)"
  "${PIP[@]}" "$TF_REQ" tf-keras numpy cmake
fi

# 5. Horovod from source with Gloo (no MPI), against that TensorFlow; pip caches the built CPU wheel. pip's cache
# does not know build flags, so a GPU build never reads or writes it (it would hand back the Gloo-only wheel), and
# a Gloo-only Horovod already in the .venv is rebuilt with NCCL.
hvd_has_nccl() { TF_CPP_MIN_LOG_LEVEL=3 "$PY" -c 'import sys, horovod.tensorflow as h; sys.exit(0 if h.nccl_built() else 1)' >/dev/null 2>&1; }
HVD_OPS="Gloo"; HVD_PIP=()  # the operations Horovod must be built with (checked in step 8)
if [ "$GPU" = "1" ]; then HVD_OPS="Gloo NCCL"; HVD_PIP=(--no-cache-dir); fi
NEED_HVD=0
if ! ls "$VENV"/lib/python3.11/site-packages/horovod/tensorflow/mpi_lib*.so >/dev/null 2>&1; then NEED_HVD=1
elif [ "$GPU" = "1" ] && ! hvd_has_nccl; then
  say "the installed horovod has no NCCL: rebuilding it with NCCL (it is replaced only once the build succeeds)"
  HVD_PIP+=(--force-reinstall --no-deps)
  NEED_HVD=1
fi
if [ "$NEED_HVD" = "1" ]; then
  say "building horovod 0.28.1 with ${HVD_OPS// / and } (about 7 minutes on 2 cores, the first time only)"
  export CMAKE_POLICY_VERSION_MINIMUM=3.5
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
  export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  WHEEL_NCCL=""
  if [ "$GPU" = "1" ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-}" ]; then
      WHEEL_NCCL=$("$PY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))') \
        || die "GPU=1: TensorFlow's NCCL wheel (nvidia-nccl-cu12) is missing; set HOROVOD_NCCL_HOME to another NCCL"
      [ -f "$WHEEL_NCCL/include/nccl.h" ] && [ -f "$WHEEL_NCCL/lib/libnccl.so.2" ] \
        || die "GPU=1: $WHEEL_NCCL lacks include/nccl.h or lib/libnccl.so.2; set HOROVOD_NCCL_HOME to another NCCL"
      # The name the linker looks for; the build records this folder in Horovod's RUNPATH, so Horovod loads the
      # same libnccl.so.2 as TensorFlow.
      ln -sf libnccl.so.2 "$WHEEL_NCCL/lib/libnccl.so"
      export HOROVOD_NCCL_INCLUDE="$WHEEL_NCCL/include" HOROVOD_NCCL_LIB="$WHEEL_NCCL/lib" HOROVOD_NCCL_LINK=SHARED
    fi
  fi
  PATH="$PWD/$VENV/bin:$PATH" "${PIP[@]}" "${HVD_PIP[@]}" --no-build-isolation horovod
fi

# 6. The project, editable, with its dev extras (pins come from constraints.txt).
# pyproject.toml's build-system table makes this a PEP 660 editable install (a .venv from before it is reinstalled).
if [ ! -f "$VENV/.project-installed" ] || [ setup.py -nt "$VENV/.project-installed" ] \
   || [ pyproject.toml -nt "$VENV/.project-installed" ] || [ constraints.txt -nt "$VENV/.project-installed" ]; then
  say "installing sparkvision (editable) with dev extras"
  "${PIP[@]}" -e '.[dev]'
  touch "$VENV/.project-installed"
fi

# 7. Fashion-MNIST from Debian (the default dataset; nothing is downloaded at run time).
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -f "$FMNIST/train-images-idx3-ubyte" ]; then
  if [ "$(id -u)" = "0" ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" != "none" ] && command -v apt-get >/dev/null; then
    say "installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || say "WARNING: apt-get install dataset-fashion-mnist failed; run it as root, or set ingest.source.path to your own IDX files"
  else
    say "WARNING: Fashion-MNIST is missing and this user cannot install it. Ask an admin to run:"
    say "           sudo apt-get install dataset-fashion-mnist"
    say "         or set ingest.source.path to a folder with MNIST-format IDX files."
  fi
fi

# 8. Horovod must list TensorFlow and Gloo (and NCCL for GPU=1), or distributed training cannot work.
CHECK=$(TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed:\n$CHECK"
for part in TensorFlow $HVD_OPS; do
  echo "$CHECK" | grep -q "\[X\] $part" || die "Horovod was built without $part:\n$CHECK"
done
say "horovod ok: TensorFlow, ${HVD_OPS// /, } built in"
touch "$VENV/.setup-done"
