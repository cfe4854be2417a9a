# `make run` scores the embedded default benchmark and compares it with the committed leaderboard (in MKL's
# compatible mode, MKL_CBWR=COMPATIBLE: MKL runs the same code on every x86 CPU; README, Reproducibility); `make test` runs
# the test suite; `make leaderboards` regenerates the committed leaderboards from scratch. All create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On these machines torch must come as this exact version: a CPU wheel that lies on the machine. A looser pin
# downloads the newest CUDA build (several GB).
TORCH_PIN ?= torch==2.13.0
# Where `make run` writes (untracked), so that it leaves the committed leaderboards as they are.
RUN_DIR := runs

.PHONY: run test install leaderboards clean

$(BIN)/saebench-poly: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[test,ray]" "$(TORCH_PIN)"
	touch $@

install: $(BIN)/saebench-poly

run: install
	MKL_CBWR=COMPATIBLE $(BIN)/saebench-poly run toy-superposition --output $(RUN_DIR)/toy-superposition.parquet
	$(BIN)/saebench-poly check $(RUN_DIR)/toy-superposition.parquet --baseline leaderboards/toy-superposition.parquet \
		--report-dir $(RUN_DIR)/check-report
	$(BIN)/saebench-poly report $(RUN_DIR)/toy-superposition.parquet

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

# After a change that moves their numbers: retrain every toy model and SAE (no cache) and rewrite the committed
# leaderboards from nothing (also across a schema version); commit leaderboards/ with the change.
leaderboards: install
	rm -rf benchmarks/.artifacts
	rm -f leaderboards/toy-superposition*.parquet leaderboards/incidental-polysemanticity*.parquet
	MKL_CBWR=COMPATIBLE $(BIN)/saebench-poly run toy-superposition
	MKL_CBWR=COMPATIBLE $(BIN)/saebench-poly run incidental-polysemanticity

clean:
	rm -rf $(VENV) benchmarks/.artifacts $(RUN_DIR)
