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
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# 1. Java 17 (Spark 3.5 runs on 8/11/17; the stack was measured on 17).
command -v java >/dev/null || die "Java 17 is required: apt-get install openjdk-17-jre-headless"
JAVA_MAJOR=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
[ "$JAVA_MAJOR" = "17" ] || die "Java 17 is required, found Java ${JAVA_MAJOR:-unknown}: apt-get install openjdk-17-jre-headless"
say "java $JAVA_MAJOR ok"

# 2. Python 3.11 virtual environment.
if [ ! -x "$PY" ]; then
  PY311=$(command -v python3.11 || true)
  [ -n "$PY311" ] || die "Python 3.11 is required (python3.11 not found on PATH)"
  say "creating $VENV with $PY311"
  "$PY311" -m venv "$VENV"
  pip_quiet "$PY" -m pip install --disable-pip-version-check -q --upgrade "pip<25" wheel setuptools
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "$VENV is not Python 3.11: remove it and run make setup again"

# 3. TensorFlow + tf-keras first: Horovod compiles against the TensorFlow it finds.
if [ "$GPU" = "1" ]; then TF_REQ="tensorflow[and-cuda]"; else TF_REQ="tensorflow"; fi
if ! "$PY" -c 'import tensorflow, tf_keras' >/dev/null 2>&1; then
  say "installing $TF_REQ and tf-keras (pinned)"
  "${PIP[@]}" "$TF_REQ" tf-keras numpy cmake
fi

# 4. Horovod from source with Gloo (no MPI), against that TensorFlow; pip caches the built wheel.
if ! ls "$VENV"/lib/python3.11/site-packages/horovod/tensorflow/mpi_lib*.so >/dev/null 2>&1; then
  say "building horovod 0.28.1 with Gloo (about 7 minutes on 2 cores, the first time only)"
  export CMAKE_POLICY_VERSION_MINIMUM=3.5
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
  export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  if [ "$GPU" = "1" ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  PATH="$PWD/$VENV/bin:$PATH" "${PIP[@]}" --no-build-isolation horovod
fi

# 5. The project, editable, with its dev extras (pins come from constraints.txt).
if [ ! -f "$VENV/.project-installed" ] || [ setup.py -nt "$VENV/.project-installed" ] || [ constraints.txt -nt "$VENV/.project-installed" ]; then
  say "installing sparkvision (editable) with dev extras"
  "${PIP[@]}" -e '.[dev]'
  touch "$VENV/.project-installed"
fi

# 6. Fashion-MNIST from Debian (the default dataset; nothing is downloaded at run time).
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

# 7. Horovod must list TensorFlow and Gloo, or distributed training cannot work.
CHECK=$(TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed:\n$CHECK"
echo "$CHECK" | grep -q '\[X\] TensorFlow' || die "Horovod was built without TensorFlow:\n$CHECK"
echo "$CHECK" | grep -q '\[X\] Gloo' || die "Horovod was built without Gloo:\n$CHECK"
say "horovod ok: TensorFlow and Gloo are built in"
touch "$VENV/.setup-done"
