# Two commands on a fresh machine:  `make run` (quickstart experiment + report)  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
OUT     ?= runs/quickstart

.PHONY: venv data run test test-all test-slow lint bench clean

venv: $(BIN)/dsgd

$(BIN)/dsgd: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Fashion-MNIST (full 60k/10k, IDX files) from Debian's dataset-fashion-mnist package.
data: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }

run: venv data
	$(BIN)/dsgd quickstart --out $(OUT)

test: venv
	$(BIN)/python -m pytest

test-all: venv
	$(BIN)/python -m pytest -m ""

test-slow: venv
	$(BIN)/python -m pytest -m slow

lint: venv
	$(BIN)/ruff check dsgd tests benchmarks

bench: venv  # the headline ratios (a few minutes), then the per-configuration table (--quick)
	$(BIN)/python benchmarks/engine.py --interleaved --models mlp lenet5 resnet8 --workers 16 64 --methods loop vmap
	$(BIN)/python benchmarks/engine.py --quick

clean:
	rm -rf $(VENV) runs *.egg-info
