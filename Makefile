# Two entry points: `make demo` (the main job on a built-in default) and `make test`.
# Both create ./.venv on first use and install the package with its test tools into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test typecheck bench clean

$(VENV)/.installed: pyproject.toml ci/constraints.txt ci/tensorrt_stubs.py
	$(PYTHON) -m venv $(VENV)
	# serve: PyTriton (its tritonserver) and tritonclient, for `osdiff serve`/`triton-repo` and their tests;
	# eval: the metric libraries of `osdiff eval`
	$(BIN)/pip install -q -c ci/constraints.txt -e ".[test,serve,eval]"
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

clean:
	rm -rf $(VENV) build *.egg-info
