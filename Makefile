# pyfastdl: the two commands of the README, and the GPU check.
#   make bench      quick benchmark report -> bench/results/<device>-<date>.{md,json,png}
#   make test       the test suite (CPU kernels, Triton under the interpreter, CUDA build checks)
#   make test-sanitize  the CPU tests under ASan+UBSan, built in build/sanitize/ (CI runs it too)
#   make gpu-check OUT=dir   on a machine with an NVIDIA GPU: rebuild for its arch, run the CUDA and
#                            Triton tests, compute-sanitizer, the GPU benchmarks, each stage under a
#                            time budget (under 8 min on an H200), summary and logs into OUT
# Each target creates the virtual environment and builds the extension when that is not done yet.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# auto: build the CUDA sources when torch has CUDA and nvcc is found (it is, with torch 2.14.1 + nvcc 13)
export PYFASTDL_CUDA ?= auto
export MAX_JOBS ?= 2
# two pytest workers (pytest-xdist): the Triton interpreter runs Python on one core per test
PYTEST_ARGS ?= -n 2 --durations=15

SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: test test-sanitize bench bench-full build venv gpu-check clean

venv: $(VENV)/.deps
$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m pyfastdl info
	touch $@

test: build
	$(PY) -m pytest tests -q -rs $(PYTEST_ARGS)

test-sanitize: $(VENV)/.deps
	bash scripts/sanitize.sh

bench: build
	$(PY) -m pyfastdl bench --quick

bench-full: build
	$(PY) -m pyfastdl bench
	# the tests past 2^31 elements (64-bit indexing; 8-17 GiB each: they skip where memory is short)
	PYFASTDL_HUGE_TESTS=1 PYFASTDL_STRICT=1 $(PY) -m pytest tests -q -rs -m slow -k past_2

gpu-check:
	bash scripts/gpu_check.sh $(or $(OUT),gpu-check-out)

clean:
	rm -rf build pyfastdl/_C*.so *.egg-info $(VENV)/.built
