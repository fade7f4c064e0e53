# Tether: `make run` starts a local server, `make test` runs every check CI runs,
# `make bench` runs the benchmarks. Both set up what they need on a fresh machine.

SHELL := /bin/bash
CARGO ?= cargo
RUN_DIR ?= .tether-run
export CARGO_TERM_COLOR ?= never

.PHONY: setup build lint test bench run dist

## setup: check the toolchain and install the system tools the tests use (as root, via apt-get);
## chromium and chromium-driver run the web application's browser tests (tests/tests/web.rs);
## postgresql, the PostgreSQL store's tests (each starts a database of its own).
setup:
	@command -v $(CARGO) >/dev/null || { echo "error: cargo is not installed; install Rust (https://rustup.rs) and retry" >&2; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	@missing=""; for tool in strace:strace ss:iproute2 openssl:openssl kill:procps nft:nftables curl:curl chromium:chromium chromedriver:chromium-driver; do \
	  command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null || { echo "error: apt-get install$$missing failed" >&2; exit 1; }; \
	  else echo "error: missing$$missing; install them (apt-get install$$missing) and retry" >&2; exit 1; fi; \
	fi
	@# PostgreSQL's server programs (the cluster tests start their own, on a Unix socket).
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing: postgresql"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null || { echo "error: apt-get install postgresql failed" >&2; exit 1; }; \
	  else echo "error: PostgreSQL is missing; install it (apt-get install postgresql) and retry" >&2; exit 1; fi; }

build: setup
	$(CARGO) build --workspace --locked

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## test: formatting, lints, then every test (end-to-end tests use the binaries built first).
test: lint build
	$(CARGO) test --workspace --locked

## bench: the fleet bench runs the release tether-server, so the release binaries are built first.
bench: setup
	$(CARGO) build --release --workspace --bins --locked
	$(CARGO) bench --workspace --locked

## dist: the release binaries (tether-server, tether, tether-agent, tether-relay), the default
## configs, the systemd units and the docs in dist/tether-VERSION-linux-ARCH.tar.gz.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
DIST_NAME := tether-$(VERSION)-linux-$(shell uname -m)
dist: setup
	$(CARGO) build --release --workspace --bins --locked
	@rm -rf dist/$(DIST_NAME) && mkdir -p dist/$(DIST_NAME)/bin dist/$(DIST_NAME)/docs
	cp target/release/tether-server target/release/tether target/release/tether-agent target/release/tether-relay dist/$(DIST_NAME)/bin/
	cp -r config dist/$(DIST_NAME)/config
	cp docs/*.md README.md dist/$(DIST_NAME)/docs/
	tar -C dist -czf dist/$(DIST_NAME).tar.gz $(DIST_NAME)
	@echo "dist/$(DIST_NAME).tar.gz: bin/ (four binaries), config/ (defaults, systemd units), docs/"

## run: a local server with a demo data dir in $(RUN_DIR) (created on first run); its config
## dir (and the secrets key ring) is $(RUN_DIR)/etc, so nothing is written to /etc.
run: build
	@mkdir -p $(RUN_DIR)
	@[ -f $(RUN_DIR)/server/admin.token ] || TETHER_CONFIG_DIR=$(RUN_DIR)/etc ./target/debug/tether-server init --data $(RUN_DIR)/server
	@echo "admin token: $$(cat $(RUN_DIR)/server/admin.token)   (also in $(RUN_DIR)/server/admin.token)"
	@echo "web application: https://localhost:8443/  (user admin, password in $(RUN_DIR)/server/admin.password; change it)"
	@echo "try: curl --cacert $(RUN_DIR)/server/ca.pem -H \"Authorization: Bearer \$$(cat $(RUN_DIR)/server/admin.token)\" https://localhost:8443/admin/health"
	TETHER_CONFIG_DIR=$(RUN_DIR)/etc TETHER_LISTEN__HTTPS=127.0.0.1:8443 ./target/debug/tether-server run --data $(RUN_DIR)/server
