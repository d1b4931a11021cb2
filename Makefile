# Two commands do all the set-up on a fresh machine with only python3:
#   make serve   - virtualenv, dependencies, default model, then serve it on 127.0.0.1:8000
#   make test    - the same set-up, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch lies on disk on these machines; a GPU host passes TORCH=torch==2.13.0
# with PIP_EXTRA_INDEX_URL pointing at its CUDA wheels (see README).
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
BIN := $(VENV)/bin

.PHONY: install model serve test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test]'
	@# build the CPU kernels now (about a minute) rather than in the first worker; cached under ~/.cache
	$(BIN)/python -m worker.kernels || echo "a CPU kernel was not built: workers will use the torch paths for it"
	touch $@

install: $(BIN)/.installed

model: install
	$(BIN)/nimbus pull

serve: model
	$(BIN)/nimbus serve --host $(HOST) --port $(PORT)

test: model
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: model
	$(BIN)/python bench/runtime.py

clean:
	rm -rf $(VENV) build *.egg-info
