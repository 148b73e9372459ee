# Every target bootstraps a fresh machine (Python 3.11 with pip): uv, then the locked environment.
SHELL := /bin/bash
# Recursive (=) so it is looked up again after the bootstrap has installed uv.
UV = $(shell command -v uv 2>/dev/null || echo python3 -m uv)
PY := .venv/bin/python

.PHONY: bootstrap chromium run test lint bench soak conformance conformance-nightly clean

bootstrap:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --all-extras --quiet

# The browser tests (pytest -m browser) drive Debian's Chromium through Playwright (Playwright's
# own browser download is not reachable). Installed with apt-get when missing and we are root
# (or have password-less sudo); otherwise those tests skip and say why.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  if [ "$$(id -u)" = 0 ]; then APT="apt-get"; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then APT="sudo apt-get"; \
	  else APT=""; fi; \
	  if [ -n "$$APT" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    { $$APT update -qq && DEBIAN_FRONTEND=noninteractive $$APT install -y -qq --no-install-recommends chromium; } \
	      >/tmp/plugin-host-chromium.log 2>&1 \
	      || { tail -5 /tmp/plugin-host-chromium.log; echo "could not install chromium: the browser tests will skip"; }; \
	  else echo "no chromium and no apt-get as root: the browser tests will skip"; fi; \
	fi

run: bootstrap
	$(PY) -m host.cli dev $(ARGS)

test: bootstrap chromium
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
