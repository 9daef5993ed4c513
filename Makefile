# The two commands a newcomer needs: `make run` (the service, embedded defaults) and `make test`.
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
export OMP_WAIT_POLICY ?= PASSIVE
UV ?= uv
PYTEST_ARGS ?=

.PHONY: deps install run test test-unit bench protos lint clean

deps:
	@scripts/install-deps.sh

install: deps
	$(UV) sync --frozen
	$(UV) run --frozen python -m scoring_service.protos

run: install
	$(UV) run --frozen fraudscore serve

test: install lint
	$(UV) run --frozen pytest -p no:cacheprovider -ra $(PYTEST_ARGS)

# ruff (rules in pyproject.toml) over the code, tests and benchmarks; mypy over scoring_service
# (the core and the adapters fully typed).
lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen mypy

test-unit: install
	$(UV) run --frozen pytest -p no:cacheprovider -ra tests/unit $(PYTEST_ARGS)

bench: install
	$(UV) run --frozen python -m bench.run $(BENCH_ARGS)

protos:
	$(UV) run --frozen python -m scoring_service.protos

clean:
	rm -rf var .cache/kafka-data scoring_service/_generated
