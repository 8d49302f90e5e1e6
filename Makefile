# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install demo test test-ray lint typecheck imports pytest fuzz soak soak-ci mutants protos bench bench-quick bench-engine profile-server clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@# torch first and pinned: the CPU build on this machine's disk, not a multi-GB CUDA build
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[server,dev,bench,ray]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/loraplex demo

test: lint typecheck imports pytest

lint: $(STAMP)
	$(BIN)/ruff check server client tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

imports: $(STAMP)
	$(BIN)/lint-imports

pytest: $(STAMP)
	$(BIN)/pytest -q

# The property tests with a larger example budget (tests/conftest.py's "fuzz" profile).
fuzz: $(STAMP)
	LORAPLEX_HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q tests/fuzz -p no:cacheprovider

# A real `loraplex serve` under a mixed abusive workload; exits 1 on any leak, lost request or
# wrong result (benchmarks/soak.py). soak-ci: the 2-minute form; soak: 30 minutes, niced.
soak-ci: $(STAMP)
	$(BIN)/python -m benchmarks.soak --duration 120 --out .cache/soak-ci

soak: $(STAMP)
	nice -n 10 $(BIN)/python -m benchmarks.soak --duration 1800

# Mutation testing (mutmut) of the scheduler, block manager, adapter store, sampler and detokenizer,
# one module at a time against its own fast tests; report: benchmarks/results/mutants.md.
# `make mutants MODULES="sampler detokenizer"` runs some of them (scripts/mutants.py).
mutants: $(STAMP)
	$(BIN)/python scripts/mutants.py $(MODULES)

# The Ray Serve application on a local Ray cluster (tests marked `ray`; minutes on 2 cores).
test-ray: $(STAMP)
	$(BIN)/pytest -q -m ray tests/cluster

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

# The user's view (issue 10): a real `loraplex serve`, 16 SDK streams, base / identical / uniform /
# distinct / mixed ranks at --max-lora-rank 64, ratios vs base and vs the bytes limit (~15 min, quiet 2 cores).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.server_bench

# The same on a tiny model, one round (a few minutes): a smoke run; results under .cache/bench.
bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.server_bench --quick

# In process, decode only: base vs mixed adapters vs PEFT's mixed batch.
bench-engine: $(STAMP)
	$(BIN)/python -m benchmarks.engine_bench

# Where the server's CPU goes per token, by thread, and py-spy samples (needs py-spy: the bench extra).
profile-server: $(STAMP)
	$(BIN)/python -m benchmarks.profile_server

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
