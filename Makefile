# Two commands for a newcomer: `make run` and `make test`. Each builds .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := cardcodec gateway clearing simulators

.PHONY: run test lint native bench-codec bench-gateway clean bench-clearing screenshot-reconcile test-hostile test-crash test-deploy

$(BIN)/.installed: pyproject.toml
	@echo "==> creating $(VENV) with $(PYTHON) and installing vipgate with its test extras"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# LISTEN=HOST:PORT serves elsewhere than the config's 127.0.0.1:8583 (`vipgate serve --listen`).
LISTEN ?=
run: $(BIN)/.installed
	@echo "==> starting the gateway from config/demo.toml"
	$(BIN)/vipgate serve --config config/demo.toml $(if $(LISTEN),--listen $(LISTEN))

lint: $(BIN)/.installed
	@echo "==> ruff check, ruff format --check, mypy --strict"
	$(BIN)/ruff check $(PACKAGES) tests
	$(BIN)/ruff format --check $(PACKAGES) tests
	$(BIN)/mypy --strict $(PACKAGES)

# The native build (docs/gateway.md): the modules of every request's path compiled by mypyc
# into a copy of the packages in $(NATIVE), which a process runs when $(NATIVE) comes first
# on its PYTHONPATH. Rebuilt whenever a source file changes.
NATIVE := build/native
NATIVE_MODULES := cardcodec/cards.py cardcodec/frame.py cardcodec/message.py \
	cardcodec/profile.py cardcodec/spec.py cardcodec/subfields.py gateway/answers.py \
	gateway/checks.py gateway/decision.py gateway/handler.py gateway/ledger/hotpath.py \
	gateway/responses.py gateway/rules.py gateway/sessions.py gateway/transactions.py
NATIVE_SOURCES := $(shell find cardcodec gateway -name '*.py' -o -name '*.ini' -o -name '*.mako')

$(NATIVE)/.built: $(BIN)/.installed pyproject.toml Makefile $(NATIVE_SOURCES)
	@echo "==> compiling $(words $(NATIVE_MODULES)) modules with mypyc into $(NATIVE) (about a minute)"
	rm -rf $(NATIVE) && mkdir -p $(NATIVE)
	cp -r cardcodec gateway pyproject.toml $(NATIVE)/
	find $(NATIVE) -name __pycache__ -prune -exec rm -rf {} +
	cd $(NATIVE) && $(CURDIR)/$(BIN)/mypyc $(NATIVE_MODULES) > mypyc.log 2>&1 \
		|| { tail -n 40 mypyc.log; exit 1; }
	touch $@

native: $(NATIVE)/.built

# The suite runs twice: on the source, then on the native build (what `make bench-gateway`
# measures and docs/deployment.md runs), where the interpreter finds $(NATIVE) first.
test: lint native
	@echo "==> pytest"
	$(BIN)/pytest
	@echo "==> pytest on the native build"
	VIPGATE_EXPECT_BUILD=native PYTHONPATH=$(CURDIR)/$(NATIVE) $(BIN)/pytest --import-mode=append

bench-codec: $(BIN)/.installed
	$(BIN)/python -m cardcodec.bench

# DURATION, RATE, TERMINALS, CARDS (default 20) and WORKERS (PostgreSQL worker counts, default
# 1,2,4) may be set: make bench-gateway DURATION=30 RATE=2000 CARDS=200 WORKERS=1,4
bench-gateway: $(BIN)/.installed native
	PYTHONPATH=$(CURDIR)/$(NATIVE) $(BIN)/python -m tests.bench_gateway

clean:
	rm -rf $(VENV) build *.egg-info

# Clearing and reconciling a month of N synthetic entries (default 1000000):
# make bench-clearing N=100000
bench-clearing: $(BIN)/.installed
	$(BIN)/python -m clearing.bench $(if $(N),--n $(N))

# The reconciliation page of a sample month, photographed by headless Chromium. Installs
# nothing: without /usr/bin/chromium it says so and stops.
SAMPLE := build/reconcile-sample
screenshot-reconcile: $(BIN)/.installed
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "==> skipped: /usr/bin/chromium is missing (Debian package: chromium)"; exit 0; fi; \
	set -e; \
	echo "==> playing a sample month into $(SAMPLE) and reconciling it"; \
	$(BIN)/python -m tests.test_clearing_e2e $(SAMPLE); \
	profile=$$(mktemp -d); \
	/usr/bin/chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
		--disable-background-networking --disable-component-update --disable-sync \
		--user-data-dir=$$profile --window-size=1280,5200 \
		--screenshot=$(SAMPLE)/reconcile.png \
		file://$(CURDIR)/$(SAMPLE)/pack/reconcile_202611.html 2>$(SAMPLE)/chromium.log; \
	rm -rf $$profile; \
	echo "==> $(SAMPLE)/reconcile.png"

# The crash-safety campaign (docs/reliability.md): SIGKILL the gateway under load and audit the
# ledger after each restart, on SQLite and on a real PostgreSQL with fsync on.
# CYCLES (default 20) and SEED may be set: make test-crash CYCLES=50 SEED=1
test-crash: $(BIN)/.installed
	$(BIN)/python -m tests.crash_campaign --cycles $(or $(CYCLES),20) --backend both $(if $(SEED),--seed $(SEED))

# The long hostile-input campaign against `vipgate serve` (docs/reliability.md, Hostile input);
# DURATION (seconds, default 120) and IDLE (idle connections per wave, default 3000) may be set:
# make test-hostile DURATION=600 IDLE=5000
test-hostile: $(BIN)/.installed
	$(BIN)/python -m tests.hostile_campaign

# The deployment of docs/deployment.md under fire: HAProxy over two gateways (WORKERS worker
# processes each, default 2) on one PostgreSQL with fsync on, the simulator's load through
# HAProxy, and KILLS SIGKILLs alternating between the gateways (each restarted but the last).
# Needs haproxy (Debian package: haproxy). DURATION (s, default 60), RATE, KILLS may be set:
# make test-deploy DURATION=300 KILLS=10
test-deploy: $(BIN)/.installed
	$(BIN)/python -m tests.deploy_campaign --duration $(or $(DURATION),60) --kills $(or $(KILLS),4) $(if $(RATE),--rate $(RATE)) $(if $(WORKERS),--workers $(WORKERS))
