# Everything a fresh machine needs: `make test` and `make demo` set up .venv, build the
# extension and run. torch / triton come from the machine's local wheels when present.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip
TORCH     ?= torch==2.14.1
TRITON    ?= triton==3.8.0
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
SOURCES   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null) setup.py pyproject.toml

.PHONY: venv build test bench bench-pytest demo info gpu-wheels clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH)" "$(TRITON)" numpy ninja rich tqdm matplotlib scikit-learn \
		pytest pytest-timeout pytest-benchmark
	touch $@

# Editable install: the compiled sparsekernels/_C*.so lands next to the sources.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import sparsekernels._C"
	touch $@

test: build
	$(PY) -m pytest tests -q -p no:cacheprovider

info: build
	$(PY) -m sparsekernels info

demo: build
	$(PY) -m sparsekernels demo

bench: build
	$(PY) -m sparsekernels bench

bench-pytest: build
	$(PY) -m pytest bench -q --benchmark-only

# Wheels for the offline GPU machine (pytest and its dependencies), carried with the tree.
gpu-wheels: venv
	$(PIP) download -q --only-binary=:all: -d bench/.wheels pytest

clean:
	rm -rf build *.egg-info sparsekernels/_C*.so $(VENV)/.built
