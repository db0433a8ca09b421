# Everything a fresh machine needs: `make test` and `make demo` set up .venv, build the
# extension and run. torch / triton come from the machine's local wheels when present.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip
TORCH     ?= torch==2.14.1
TRITON    ?= triton==3.8.0
CLIENTS   ?= torchvision==0.29.1 transformers==5.24.0 timm==1.0.31 lightning==2.6.6 accelerate==1.15.0 \
             safetensors==0.8.0 hypothesis
CUDA_HOME ?= /usr/local/cuda
GPU_WHEELS := bench/.wheels
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_12_x86_64 \
                 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64
export CUDA_HOME
SOURCES   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.inc' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null) setup.py pyproject.toml

.PHONY: venv build test bench bench-pytest demo info gpu-wheels clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH)" "$(TRITON)" numpy ninja rich tqdm matplotlib scikit-learn \
		pytest pytest-timeout pytest-benchmark
	# The clients the tests train with (models built from config, never downloaded),
	# pinned next to torch so the resolver never replaces it.
	$(PIP) install -q "$(TORCH)" $(CLIENTS)
	touch $@

# Editable install: the compiled sparsekernels/_C*.so lands next to the sources.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import sparsekernels._C"
	touch $@

# gpu-wheels too: a test rehearses bench/gpu_check.sh with only those wheels.
test: build $(GPU_WHEELS)/.complete
	$(PY) -m pytest tests -q -p no:cacheprovider

info: build
	$(PY) -m sparsekernels info

demo: build
	$(PY) -m sparsekernels demo

bench: build
	$(PY) -m sparsekernels bench

bench-pytest: build
	$(PY) -m pytest bench -q --benchmark-only

# Wheels for the offline GPU machine, carried with the tree (run(carry=["bench/.wheels"])):
# pytest and its dependencies, and ninja (torch does not depend on it; without it the
# build compiles one file at a time). For its Python (3.12), manylinux x86_64; all of
# them are pure Python or py3-none, so they install on this machine's Python as well.
gpu-wheels: $(GPU_WHEELS)/.complete
$(GPU_WHEELS)/.complete: $(VENV)/.installed
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PIP) download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS) pytest ninja
	touch $@

clean:
	rm -rf build *.egg-info sparsekernels/_C*.so $(VENV)/.built
