# The two commands a newcomer needs (each does its own set-up):
#   make demo   train a small CLIP on generated data: local Ray, local MLflow store
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test sweep bench-model bench-train clean

# pip (not uv/poetry) so that the torch/torchvision wheels on local disk are found.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python jobs/train.py

# The scaling sweep on the demo data: 9 trials, about a quarter of an hour on 2 cores.
sweep: $(VENV)/.installed
	$(BIN)/python tune/sweep.py --config configs/sweep-demo-cpu.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

bench-model: $(VENV)/.installed
	$(BIN)/python benchmarks/model_step.py

bench-train: $(VENV)/.installed
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache mlruns mlflow.db runs demo-data sweeps
