# Quarry front door. Every target sets itself up: creates .venv if absent and installs the
# project into it (pyproject.toml is the only list of dependencies).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.quarry-installed
N      ?= 1000
SEED   ?= 1

.PHONY: setup demo test test-all fuzz formal bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,data]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import hw, sim, compiler, boards, torch, amaranth, cocotb"
	$(PY) -c "from sim.verilator import ensure_verilator; ensure_verilator()"
	@touch $(STAMP)

## make demo: the main job on the bundled default
demo: setup
	$(PY) -m sim.demo

## make test: the test suite (unit, golden, Amaranth-sim and Verilator system tests)
test: setup
	$(PY) -m pytest -n 2 -q tests

## make fuzz N=10000: random programs x configs, RTL (Verilator) against the golden model;
## resumable (build/fuzz/state-s$(SEED).json; FRESH=1 starts over), record in bench/results/fuzz.*
fuzz: setup
	$(PY) -m sim.fuzz --n $(N) --seed $(SEED) $(if $(FRESH),--fresh,) $(if $(BUDGET),--budget $(BUDGET),)

## make formal: the formal proofs (SymbiYosys + boolector from pip), including the controller BMCs
## (minutes; `make test` runs only the fast ones)
formal: setup
	$(PY) -m pytest -q -n 0 -s tests/test_formal.py --slow-formal

## make bench: every benchmark (hours), results in bench/results/ and README.md's results block.
## QUICK=1: the smoke test (`--quick`: real code paths on the smallest cases, zoo models trained for a
## few epochs); it writes build/bench/quick/ and never touches bench/results/ or README.md
bench: setup
	$(PY) -m bench $(if $(QUICK),--quick,)

clean:
	rm -rf build .pytest_cache
