# Two commands from a fresh clone: `make test` and `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv install test test-gpu bench clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_SPEC) numpy pytest pytest-benchmark pytest-timeout ninja tabulate matplotlib tqdm timm
	touch $@

venv: $(VENV)/.deps

# Builds fastres._C in place when torch has CUDA and a CUDA toolkit is found (see setup.py).
install: venv
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -m fastres.info

# The suite is two pytest sessions (tests/conftest.py): the CPU session — everything but the `gpu`
# tests, Triton under its interpreter — and the GPU session, `-m gpu` (the selection
# benchmarks/gpu_check.sh runs too). Without a GPU the CPU session is the whole suite; with one,
# `make test` runs the CPU session with CUDA hidden, then the GPU session, and fails if either does.
HAS_CUDA = $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null

test: install
	@if $(HAS_CUDA); then \
		echo "== CPU session: Triton interpreter, CUDA hidden (CUDA_VISIBLE_DEVICES=) =="; \
		CUDA_VISIBLE_DEVICES= $(PY) -m pytest tests -m "not gpu" $(PYTEST_ARGS); cpu=$$?; \
		echo "== GPU session: pytest -m gpu =="; \
		$(PY) -m pytest tests -m gpu $(PYTEST_ARGS); gpu=$$?; \
		echo "CPU session rc=$$cpu, GPU session rc=$$gpu"; \
		[ $$cpu -eq 0 ] && [ $$gpu -eq 0 ]; \
	else \
		$(PY) -m pytest tests $(PYTEST_ARGS); \
	fi

test-gpu: install
	$(PY) -m pytest tests -m gpu $(PYTEST_ARGS)

# GPU: the full suite into benchmarks/results/ (BENCH_ARGS=--quick for the short one). No GPU: small
# CPU figures into benchmarks/results/cpu/ (not committed), labelled as such; a committed reference
# run of them is benchmarks/results/cpu_reference/ (benchmarks/README.md).
bench: install
	$(PY) -m benchmarks.run --cpu-if-no-gpu $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastres/_C*.so
