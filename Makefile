# Every target bootstraps a fresh machine (Python 3.11 with pip): uv, then the locked environment.
SHELL := /bin/bash
# Recursive (=) so it is looked up again after the bootstrap has installed uv.
UV = $(shell command -v uv 2>/dev/null || echo python3 -m uv)
PY := .venv/bin/python

.PHONY: bootstrap run test lint bench soak conformance conformance-nightly clean

bootstrap:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --all-extras --quiet

run: bootstrap
	$(PY) -m host.cli dev $(ARGS)

test: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS)

lint: bootstrap
	$(PY) -m ruff check host tests bench
	$(PY) -m ruff format --check host tests bench
	$(PY) -m mypy

bench: bootstrap
	$(PY) -m bench $(BENCH_ARGS)

# PyMongo's own tests against the embedded server, compared with tests/conformance/expected.toml.
conformance: bootstrap
	$(PY) -m tests.conformance.run --suite ci $(CONFORMANCE_ARGS)

conformance-nightly: bootstrap
	$(PY) -m tests.conformance.run --suite all $(CONFORMANCE_ARGS)

soak: bootstrap
	$(PY) -m pytest tests/faults -m soak --soak $(PYTEST_ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
