#!/usr/bin/env bash
# The Dockerfile's build steps, one function each. The Dockerfile runs exactly this script
# (`build-steps.sh STEP...`), and CI runs it on the host (tests/deploy/test_deploy_files.py),
# so the image recipe and what CI checks cannot drift apart.
#
# usage: build-steps.sh STEP [STEP...]   (run from the source tree, or set SRC)
#   system  CUDA base image only: install python3 + venv from the distribution (apt), and what
#           Triton's first launch on the GPU needs: a C compiler (gcc) and the Python headers
#           (python3-dev) to build its small launcher module
#   venv    create the virtual environment $VENV (VENV_SYSTEM_SITE=1 lets it see the host's
#           packages, so a CI run installs nothing twice)
#   torch   pip install $TORCH_SPEC [--index-url $TORCH_INDEX]
#   app     pip install the lorafold package from $SRC (not editable, no test extras)
#   kernels build the compiled CPU kernels into $LORAFOLD_CACHE/cpu_kernels (installs g++ from
#           apt when no compiler is there); LORAFOLD_CPU_MARCH is gcc's -march, and the server
#           must run with the same value to find the library (the Dockerfile sets both)
#   model   fetch the default model into $LORAFOLD_CACHE (cached safetensors; offline at run time);
#           PRUNE_GGUF=1 then drops the GGUF it was converted from (only needed for conversion)
#   user    create the non-root user $APP_USER (uid $APP_UID) and the /data volumes it owns
#   check   import the server and run `lorafold --help` with the venv's python
#
# environment (defaults in brackets):
#   SRC [.]  VENV [/opt/venv]  VENV_SYSTEM_SITE [0]  TORCH_SPEC [torch==2.13.0]
#   TORCH_INDEX [empty: pip's configured index]  LORAFOLD_CACHE [~/.cache/lorafold]
#   LORAFOLD_CPU_MARCH [native]  PRUNE_GGUF [0]  APP_USER [lorafold]  APP_UID [10001]  DATA_DIR [/data]
set -euo pipefail

SRC=${SRC:-.}
VENV=${VENV:-/opt/venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
APP_USER=${APP_USER:-lorafold}
APP_UID=${APP_UID:-10001}
DATA_DIR=${DATA_DIR:-/data}
PY="$VENV/bin/python"

log() { printf 'build-steps: %s\n' "$*" >&2; }

step_system() {
    # nvidia/cuda runtime images are plain Ubuntu: no python. The distribution's python3
    # (3.12 on Ubuntu 24.04) satisfies requires-python >= 3.10. Triton compiles a C launcher
    # for each kernel at its first launch (the LoRA kernels, torch.compile's FlexAttention):
    # without gcc and Python.h the server's first GPU step fails.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates
    rm -rf /var/lib/apt/lists/*
}

step_venv() {
    local flags=()
    [[ "${VENV_SYSTEM_SITE:-0}" == 1 ]] && flags+=(--system-site-packages)
    python3 -m venv "${flags[@]}" "$VENV"
}

step_torch() {
    local index=()
    [[ -n "$TORCH_INDEX" ]] && index=(--index-url "$TORCH_INDEX")
    # --no-cache-dir: pip's wheel cache would otherwise stay in the image layer (~200 MB).
    "$PY" -m pip install --no-cache-dir --quiet "${index[@]}" "$TORCH_SPEC"
}

step_app() {
    # Not editable: the image carries the installed package, not the source tree.
    "$PY" -m pip install --no-cache-dir --quiet "$SRC"
}

step_kernels() {
    if ! command -v g++ >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends g++
        rm -rf /var/lib/apt/lists/*
    fi
    "$PY" -m lorafold.kernels.cpu_ext
    chmod -R a+rX "${LORAFOLD_CACHE:-$HOME/.cache/lorafold}/cpu_kernels"
}

step_model() {
    "$PY" -m lorafold.clients.cli fetch-model
    local cache=${LORAFOLD_CACHE:-$HOME/.cache/lorafold}
    if [[ "${PRUNE_GGUF:-0}" == 1 ]]; then
        rm -rf "$cache/gguf"  # 94 MB the server never reads once the safetensors exist
    fi
    # The conversion writes a 0700 folder; the server runs as another user than the builder.
    chmod -R a+rX "$cache"
}

step_user() {
    useradd --create-home --uid "$APP_UID" --shell /usr/sbin/nologin "$APP_USER"
    mkdir -p "$DATA_DIR/adapters" "$DATA_DIR/state"
    chown -R "$APP_USER:$APP_USER" "$DATA_DIR"
}

step_check() {
    "$PY" -c "import lorafold.server.api.app, lorafold.server.models.loader"
    "$VENV/bin/lorafold" --help >/dev/null
    if [[ "$("$PY" -c 'import torch; print(torch.version.cuda is not None)')" == True ]]; then
        # a CUDA build of torch: Triton's first launch needs a C compiler and Python.h here
        command -v gcc >/dev/null || { log "CUDA image without gcc: Triton cannot build its launcher"; exit 1; }
        "$PY" -c 'import sysconfig, pathlib, sys; sys.exit(not (pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h").exists())' \
            || { log "CUDA image without the Python headers (python3-dev): Triton cannot build its launcher"; exit 1; }
    fi
    log "ok: $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
}

if [[ $# -eq 0 ]]; then
    sed -n '2,25p' "$0" >&2
    exit 2
fi
for step in "$@"; do
    case "$step" in
        system|venv|torch|app|kernels|model|user|check) log "step $step"; "step_$step" ;;
        *) log "unknown step '$step' (steps: system venv torch app kernels model user check)"; exit 2 ;;
    esac
done
