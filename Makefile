# make train   set up (first time) and train the default experiment: (n=50, k=3) sparse parity
# make test    set up (first time) and run the test suite on the CPU
# make bench   set up and run the microbenchmarks (kernels on a GPU, reference paths on a CPU)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= auto
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test bench clean
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	TORCH=$(TORCH) sh scripts/install_torch.sh $(BIN)/pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q --numprocesses=auto --maxprocesses=4 --dist loadgroup $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.bitgen
	$(BIN)/python -m benchmarks.attention

clean:
	rm -rf $(VENV) runs *.egg-info
