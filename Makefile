# The two commands a newcomer needs: `make run` (the service, embedded defaults) and `make test`.
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
export OMP_WAIT_POLICY ?= PASSIVE
UV ?= uv
PYTEST_ARGS ?=

.PHONY: deps install run test test-unit bench bench-overload bench-soak bench-score-batch bench-dashboard plots data compose-test protos lint clean

deps:
	@scripts/install-deps.sh

# Bytecode compiled once here (site-packages by uv, our packages by compileall): with
# PYTHONDONTWRITEBYTECODE set (many CI runners, this repo's dev machines) every new process would
# otherwise compile its imports from source again: ~13 s of CPU per `fraudscore serve` start on
# 2 cores instead of ~5, and the test suite starts well over a hundred of them.
install: deps
	$(UV) sync --frozen --compile-bytecode
	$(UV) run --frozen python -m scoring_service.protos
	$(UV) run --frozen python -m compileall -q -j 0 scoring_service fraudscore_client tests bench >/dev/null

run: install
	$(UV) run --frozen fraudscore serve

# --durations: the slowest tests in every run's output (the suite is kept well under 20 minutes).
test: install lint
	$(UV) run --frozen pytest -p no:cacheprovider -ra --durations=25 $(PYTEST_ARGS)

# ruff (rules in pyproject.toml) over the code, tests and benchmarks; mypy over scoring_service
# (the core and the adapters fully typed).
lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen mypy

test-unit: install
	$(UV) run --frozen pytest -p no:cacheprovider -ra tests/unit $(PYTEST_ARGS)

bench: install
	$(UV) run --frozen python -m bench.run $(BENCH_ARGS)

# Overload curve (0.5x-3x of capacity, open loop), the one-hour soak, ScoreBatch against the budget
# (docs/overload.md), and the pictures of the benchmark JSON (docs/img).
bench-overload: install
	$(UV) run --frozen python -m bench.overload $(BENCH_ARGS)

bench-soak: install
	$(UV) run --frozen python -m bench.soak $(BENCH_ARGS)

bench-score-batch: install
	$(UV) run --frozen python -m bench.score_batch $(BENCH_ARGS)

plots: install
	$(UV) run --frozen python -m bench.plots

# The dashboard's panels from a real Prometheus scraping the service under load (docs/img/dashboard.png;
# needs Debian's prometheus).
bench-dashboard: install
	$(UV) run --frozen python -m bench.dashboard $(BENCH_ARGS)

# The handbook data set, downloaded and checked (docs/client.md).
data: install
	$(UV) run --frozen fraudscore data handbook --trust-unlisted

# The deployment test (minutes): Docker, stand-in images where no registry is reachable, both image
# targets, compose up / score / publish / nightly / CACHE / down -v (docs/deploy.md).
compose-test: install
	scripts/docker/setup.sh
	FRAUDSCORE_DOCKER_TESTS=1 $(UV) run --frozen pytest -p no:cacheprovider -ra -s tests/deploy $(PYTEST_ARGS)

protos:
	$(UV) run --frozen python -m scoring_service.protos

clean:
	rm -rf var .cache/kafka-data scoring_service/_generated
