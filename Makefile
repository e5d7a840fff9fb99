# Two entry points: `make demo` (the main job on a built-in default) and `make test`.
# Both create ./.venv on first use and install the package with its test tools into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test typecheck bench clean gpu-kit gpu-rehearsal

$(VENV)/.installed: pyproject.toml ci/constraints.txt ci/tensorrt_stubs.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c ci/constraints.txt -e ".[test]"
	# Type stubs of the TensorRT 10.13 Python API; --no-deps because its metadata asks for
	# the real tensorrt, which PyPI only has as a stub that downloads from NVIDIA.
	$(BIN)/pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	$(BIN)/python ci/tensorrt_stubs.py
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/osdiff demo

test: install
	$(BIN)/python -m pytest -q
	$(MAKE) typecheck

typecheck: install
	$(BIN)/python -m mypy

# What the lent GPU machine lacks (wheels, the original implementation, golden checkpoints), in
# the git-ignored .gpu-kit/; prints the size of what travels. ORIGINAL: a checkout, bare git
# directory or URL of cheesejiang/OSDiff (default: cloned from GitHub).
gpu-kit:
	$(PYTHON) benchmarks/gpu_kit.py $(if $(ORIGINAL),--original $(ORIGINAL))

# The GPU check rehearsed on the CPU (demo config, small size): what CI runs in tests/test_gpu_check.py.
gpu-rehearsal: install
	OSDIFF_GPU_CHECK_DEVICE=cpu PYTHON=$(BIN)/python benchmarks/gpu_check.sh out/gpu-rehearsal

clean:
	rm -rf $(VENV) build *.egg-info
