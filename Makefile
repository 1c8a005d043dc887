# The two commands a new user needs (see README):
#   make run    build pullgate and serve the embedded default (loopback mirror on 127.0.0.1:5000)
#   make test   install the test bed (Debian packages) and run every check and test
#   make bench  run the benchmarks side by side (bench/README.md); BENCH_ARGS=--quick for a smoke run
# They install what they need on a fresh Debian 12 machine (as root, or with sudo).

CARGO ?= cargo

.PHONY: run test bench build-deps test-deps lint unit check-conf

run: build-deps
	$(CARGO) run --release -- serve

test: test-deps lint
	$(CARGO) build --all-targets
	$(MAKE) --no-print-directory dev-certs
	./target/debug/pullgate check conf/*.toml deploy/systemd/config.toml deploy/container/config.toml
	$(CARGO) test --all-targets -- --test-threads=4

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	@if grep -rl 'pingora' src/ | grep -vE '^src/(gateway|listen)/|^src/(lib|main)\.rs$$'; then \
		echo "only gateway/ and listen/ may use Pingora (STYLE.md)"; exit 1; fi

bench: build-deps test-deps
	CARGO=$(CARGO) bench/run $(BENCH_ARGS)

build-deps:
	@command -v cmake >/dev/null || { echo "installing cmake (pingora builds zlib-ng with it)"; \
		$$( [ "$$(id -u)" -eq 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" -eq 0 ] || echo sudo ) apt-get install -y -qq cmake; }

test-deps:
	bash tests/install-deps.sh

# Development CA and certificates for conf/private-endpoint.toml (README, "Development
# certificates"); kept when certs/dev/ca.crt exists. Never for production.
dev-certs:
	@test -f certs/dev/ca.crt || { \
		$(CARGO) run --quiet -- dev-certs --out certs/dev --name icr --host private.icr.io \
			--host icr.data.vpc.internal --host 127.0.0.1 --client build-farm.internal && \
		$(CARGO) run --quiet -- dev-certs --out certs/dev --name ghcr --host private.ghcr.io; }
