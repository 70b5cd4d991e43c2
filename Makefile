# One command sets up and runs the pipeline (`make demo`), one sets up and runs the tests (`make test`).
# Both create or update .venv and install only what is missing.
# On a CUDA machine choose the torch build yourself, e.g.  make demo TORCH_SPEC="torch>=2.4"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export WANDB_MODE ?= offline

.PHONY: setup demo test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/dmd pipeline

# One thread per process: the suite runs servers and stage subprocesses side by side, and torch's default of one
# thread per core oversubscribes the cores many times over. Test files run on TEST_WORKERS processes (pytest-xdist),
# each file whole on one of them, so a file's shared fixtures are built once.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
