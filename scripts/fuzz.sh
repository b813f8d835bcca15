#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/fuzz_targets/) for FUZZ_SECONDS each (default 60): all of them, or
# those named as arguments. Installs cargo-fuzz from crates.io if it is missing. libFuzzer's
# instrumentation needs unstable compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# Its own target dir: sanitizer builds share nothing with the workspace's.
export CARGO_TARGET_DIR="$KVMESH_CACHE/fuzz-target" RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
failed=()
for target in "${targets[@]}"; do
    corpus="$KVMESH_CACHE/fuzz-corpus/$target"
    mkdir -p "$corpus"
    echo "fuzz: $target for ${seconds}s (corpus $corpus)"
    seeds=()
    [ -d "fuzz/seeds/$target" ] && seeds=("seeds/$target")
    if ! (cd fuzz && cargo fuzz run -O "$target" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1); then
        failed+=("$target")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (the input is under fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a crash"
