# Two commands on a fresh machine: `make repro` runs the pipeline, `make test` the tests.
# Each first makes .venv from requirements.lock when it is missing or older than the lock:
# every package pinned, with its hashes, installed by pip, which also looks in the pip
# configuration's local wheel folders (uv and poetry do not). Extra arguments: ARGS, e.g.
# `make repro ARGS=--force`, `make test ARGS="-k sweep"`.
#
# The tests in tiers, by pytest markers (pyproject.toml; tests/conftest.py marks each test by what
# it starts): `make test-fast` runs every test that starts no server, cluster, queue or whole
# `dvc repro`, trains nothing on real MNIST and makes no real fault, in a few minutes; `make test-team`,
# `make test-lab`, `make test-faults`, ... one tier each.

PYTHON ?= python3
VENV := .venv
# GPU=1's venv is another (see $(INSTALLED) below).
INSTALLED = $(VENV)/.installed-from-lock$(if $(GPU),-gpu)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

TIERS := team cluster queue server repro ui lab faults
# Three pytest processes (pytest-xdist), a test file each at a time, on CI's 2 cores: a stage
# trains on one thread and many tests wait on servers, queues and clusters, so two left the cores
# idle about a quarter of the time (14:15 in CI for ~1,300 CPU-seconds of work); three kept them
# 99% busy and ran the suite in 10:54 here. JOBS=0 runs the tests in this process.
JOBS ?= 3
PYTEST := python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder
SPACE := $(subst ,, )
FAST := not ($(subst $(SPACE), or ,$(TIERS)))

.PHONY: repro publish test test-fast $(TIERS:%=test-%) env lock exp

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

# The experiments in a terminal: each one's changed params and the comparison's headline
# (data/metrics.json: each variant's test accuracy, difference from the reference in points and
# verdict), for two variants and a changed param within 120 columns (tests/test_first_hour.py).
# Plain `dvc exp show` has ~85 columns: the code deps' hashes and each variant's test loss,
# left out here (they stay in `dvc exp show`, `dvc metrics show`).
EXP_DROP := ^(Created|params\.yaml|requirements\.lock|environment\.json|pipeline/.*|data/.*|.*\.loss)$$
EXP_KEEP := .*\.(acc|diff|verdict)$$
exp:
	dvc exp show --no-pager --only-changed --drop '$(EXP_DROP)' --keep '$(EXP_KEEP)' $(ARGS)

# pip byte-compiles what it installs (20,307 .pyc files). Not with --no-compile: the build took 97 s,
# not 162 s, but with PYTHONDONTWRITEBYTECODE=1 (set on the machine it was measured on) every process
# then compiles what it imports, torch, MLflow and DVC in 13 s rather than 6 s, in each of the
# suite's hundreds of processes; --no-compile then `compileall -j 0` on 2 cores: 140 s, pip's 135 s.
#
# The CPU set-up: 5.6 GB, about 2 minutes (2 cores, wheels cached); the torch wheel PyPI serves
# for Linux is CUDA's and links its libraries (nvidia-*, 3.2 GB) however it runs: without them
# `import torch` fails (libcudnn.so.9: cannot open shared object file). triton (0.9 GB) is only
# torch.compile's, which the stages never call: `make env GPU=1` adds it (requirements-gpu.lock),
# where torch.compile is wanted on a GPU (export GPU=1 there: a command without it builds the CPU
# set-up again). Each phase says what it does: pip lists the packages as it collects them (~30 s),
# then installs them all without a word (~80 s of the 94-108 s a CPU set-up took here), so a line
# every 15 s says how big .venv has grown.
GPU ?=
LOCKS := requirements.lock $(if $(GPU),requirements-gpu.lock)
SIZE := $(if $(GPU),6.5 GB,5.6 GB)
$(INSTALLED): $(LOCKS) pyproject.toml
	rm -rf $(VENV)
	@echo "make: creating $(VENV), then installing $(strip $(LOCKS)): $(SIZE), about 2 minutes"
	$(PYTHON) -m venv $(VENV)
	@echo "$(VENV)/bin/pip install --require-hashes --no-deps $(LOCKS:%=-r %)"
	@( while sleep 15; do echo "make: $(VENV) holds $$(du -sh $(VENV) | cut -f1) of about $(SIZE)"; done ) & \
		ticker=$$!; $(VENV)/bin/pip install --require-hashes --no-deps $(LOCKS:%=-r %); \
		status=$$?; kill $$ticker; exit $$status
	@echo "make: installing this project (editable)"
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation --editable .
	touch $@
	@echo "make: $(VENV) ready ($$(du -sh $(VENV) | cut -f1))"

# After changing pyproject.toml's dependencies: pin everything again, with hashes (pip-tools
# runs from a venv of its own, so .venv stays exactly what the lock pins), then move the
# GPU-only pins (GPU_ONLY: each package's block, its hashes and `# via` lines) into
# requirements-gpu.lock.
GPU_ONLY := triton
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip-tools
	.venv-lock/bin/pip-compile --quiet --generate-hashes --extra test --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml
	echo "# torch.compile's GPU kernels: pinned by \`make lock\` with requirements.lock, installed by \`make env GPU=1\`" \
		> requirements-gpu.lock
	awk '/^[A-Za-z0-9]/ { gpu = $$1 ~ /^($(subst $(SPACE),|,$(GPU_ONLY)))==/ } \
		{ if (gpu) print >> "requirements-gpu.lock"; else print > ".venv-lock/cpu.lock" }' requirements.lock
	mv .venv-lock/cpu.lock requirements.lock
