# Two commands on a fresh machine: `make repro` runs the pipeline, `make test` the tests.
# Each first makes .venv from requirements.lock when it is missing or older than the lock:
# every package pinned, with its hashes, installed by pip, which also looks in the pip
# configuration's local wheel folders (uv and poetry do not). Extra arguments: ARGS, e.g.
# `make repro ARGS=--force`, `make test ARGS="-k sweep"`.
#
# The tests in tiers, by pytest markers (pyproject.toml; tests/conftest.py marks each test by what
# it starts): `make test-fast` runs every test that starts no server, cluster, queue or whole
# `dvc repro` and trains nothing on real MNIST, in a few minutes; `make test-team`, `make test-lab`, ... one tier each.

PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed-from-lock
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

TIERS := team cluster queue server repro ui lab
# Two pytest processes (pytest-xdist), a test file each at a time: one keeps about one core busy
# (each stage trains on one thread). JOBS=0 runs the tests in this process.
JOBS ?= 2
PYTEST := python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder
SPACE := $(subst ,, )
FAST := not ($(subst $(SPACE), or ,$(TIERS)))

.PHONY: repro test test-fast $(TIERS:%=test-%) env lock

# `dvc repro`, the variants' train stages side by side (pipeline/commands/repro.py); ARGS takes
# --force and --jobs N.
repro: $(INSTALLED)
	python -m pipeline.commands.repro $(ARGS)

test: $(INSTALLED)
	$(PYTEST) $(ARGS)

test-fast: $(INSTALLED)
	$(PYTEST) -m "$(FAST)" $(ARGS)

$(TIERS:%=test-%): test-%: $(INSTALLED)
	$(PYTEST) -m $* $(ARGS)

env: $(INSTALLED)

$(INSTALLED): requirements.lock pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --quiet --require-hashes --no-deps -r requirements.lock
	$(VENV)/bin/pip install --quiet --quiet --no-deps --no-build-isolation --editable .
	touch $@

# After changing pyproject.toml's dependencies: pin everything again, with hashes (pip-tools
# runs from a venv of its own, so .venv stays exactly what the lock pins).
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip-tools
	.venv-lock/bin/pip-compile --quiet --generate-hashes --extra test --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml
