# `make run` scores the embedded default benchmark; `make test` runs the test suite. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On these machines torch must come as this exact version: a CPU wheel that lies on the machine. A looser pin
# downloads the newest CUDA build (several GB).
TORCH_PIN ?= torch==2.13.0

.PHONY: run test install clean

$(BIN)/saebench-poly: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[test,ray]" "$(TORCH_PIN)"
	touch $@

install: $(BIN)/saebench-poly

run: install
	$(BIN)/saebench-poly run && $(BIN)/saebench-poly report leaderboards/toy-superposition.parquet

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) benchmarks/.artifacts
