# Two commands for a newcomer: `make run` and `make test`. Each builds .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := cardcodec gateway clearing simulators

.PHONY: run test lint bench-codec bench-gateway clean

$(BIN)/.installed: pyproject.toml
	@echo "==> creating $(VENV) with $(PYTHON) and installing vipgate with its test extras"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	@echo "==> starting the gateway from config/demo.toml"
	$(BIN)/vipgate serve --config config/demo.toml

lint: $(BIN)/.installed
	@echo "==> ruff check, ruff format --check, mypy --strict"
	$(BIN)/ruff check $(PACKAGES) tests
	$(BIN)/ruff format --check $(PACKAGES) tests
	$(BIN)/mypy --strict $(PACKAGES)

test: lint
	@echo "==> pytest"
	$(BIN)/pytest

bench-codec: $(BIN)/.installed
	$(BIN)/python -m cardcodec.bench

# DURATION, RATE and TERMINALS may be set: make bench-gateway DURATION=30 RATE=2000
bench-gateway: $(BIN)/.installed
	$(BIN)/python -m tests.bench_gateway

clean:
	rm -rf $(VENV) build *.egg-info
