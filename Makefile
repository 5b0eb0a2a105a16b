# x2v: two commands on a fresh machine.
#   make up      run the system (installs what it needs first)
#   make test    run every test (installs what it needs first)
# and `make images`: the container images, from Debian's mirrors and the binaries built here (docker/).
# Heavy caches (Python venv with torch, cargo target directory) live outside the clone, in $(CACHE).

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/x2v
VENV ?= $(CACHE)/venv
export CARGO_TARGET_DIR ?= $(CACHE)/target
# tch links the libtorch of the venv's pip torch wheel.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
export X2V_PYTHON := $(VENV)/bin/python

.PHONY: setup build up images test test-rust test-python lint fmt doctor

setup:
	@VENV=$(VENV) bash scripts/setup.sh

build: setup
	cargo build --workspace --all-targets

up: setup
	cargo build --release -p x2v
	$(CARGO_TARGET_DIR)/release/x2v up $(ARGS)

# x2v-base, x2v-redis, x2v-gateway and x2v:cpu without a registry; ARGS=--cuda adds x2v:cuda.
images: setup
	bash docker/images.sh $(ARGS)

doctor: setup
	cargo run -q -p x2v -- doctor $(ARGS)

# The workspace's crates compile through clippy-driver with warnings denied: the test build is also
# the lint pass (`cargo clippy` would check every dependency a second time, in check mode).
CLIPPY_DRIVER = $(shell rustup which clippy-driver 2>/dev/null || command -v clippy-driver)
test lint: export RUSTC_WORKSPACE_WRAPPER = $(CLIPPY_DRIVER)
test lint: export CLIPPY_ARGS = -Dwarnings
# The tests and every binary the Python suites start.
COMPILE_TESTS = cargo test --workspace --all-targets --no-fail-fast --no-run && \
	cargo build --workspace --bins --examples

# Every crate compiles once (the test profile, and the binaries the Python suites start), linted on
# the way; then the Rust tests and the three Python suites run side by side, each one's output
# printed when all end.
PYTEST = $(X2V_PYTHON) -m pytest -q --durations=5
test: setup
	$(COMPILE_TESTS)
	bash scripts/side-by-side.sh "cargo test --workspace --all-targets --no-fail-fast" \
		"$(PYTEST) gateway/tests/py" "$(PYTEST) tests/e2e" "$(PYTEST) tests/containers"

test-rust:
	cargo test --workspace --all-targets --no-fail-fast

# End-to-end tests with the official openai client against the real binaries and redis-server:
# the gateway against a test worker, the whole multi-process pipeline (tests/e2e), and the same
# binaries in containers of docker/compose.cpu.yml, faults injected with Docker (tests/containers;
# skipped, with the reason, where no Docker Engine runs). One after the other here; `make test`
# runs them side by side.
test-python:
	$(PYTEST) gateway/tests/py
	$(PYTEST) tests/e2e
	$(PYTEST) tests/containers

# Clippy's lints on every target, as `make test` builds them (after `make test`: nothing to do).
lint:
	@test -n "$(CLIPPY_DRIVER)" || { echo "lint: clippy-driver not found (rustup component add clippy)" >&2; exit 1; }
	$(COMPILE_TESTS)

fmt:
	cargo fmt --all
