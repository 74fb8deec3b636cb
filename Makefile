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
# Three pytest processes (pytest-xdist), a test file each at a time, on CI's 2 cores: a stage
# trains on one thread and many tests wait on servers, queues and clusters, so two left the cores
# idle about a quarter of the time (14:15 in CI for ~1,300 CPU-seconds of work); three kept them
# 99% busy and ran the suite in 10:54 here. JOBS=0 runs the tests in this process.
JOBS ?= 3
PYTEST := python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder
SPACE := $(subst ,, )
FAST := not ($(subst $(SPACE), or ,$(TIERS)))

.PHONY: repro publish test test-fast $(TIERS:%=test-%) env lock

# `dvc repro`, the variants' train stages side by side (pipeline/commands/repro.py); ARGS takes
# --force and --jobs N.
repro: $(INSTALLED)
	python -m pipeline.commands.repro $(ARGS)

# The workspace's results (every variant and seed, the comparison, the registered model) into the
# tracking store MLFLOW_TRACKING_URI names (default: mlflow.db here), without training; ARGS takes
# --dry-run (pipeline/commands/publish.py).
publish: $(INSTALLED)
	python -m pipeline.commands.publish $(ARGS)

test: $(INSTALLED)
	$(PYTEST) $(ARGS)

test-fast: $(INSTALLED)
	$(PYTEST) -m "$(FAST)" $(ARGS)

$(TIERS:%=test-%): test-%: $(INSTALLED)
	$(PYTEST) -m $* $(ARGS)

env: $(INSTALLED)

# pip byte-compiles what it installs (20,307 .pyc files). Not with --no-compile: the build took 97 s,
# not 162 s, but with PYTHONDONTWRITEBYTECODE=1 (set on the machine it was measured on) every process
# then compiles what it imports, torch, MLflow and DVC in 13 s rather than 6 s, in each of the
# suite's hundreds of processes; --no-compile then `compileall -j 0` on 2 cores: 140 s, pip's 135 s.
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
