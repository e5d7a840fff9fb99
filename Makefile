# Two entry points: `make demo` (the main job on a built-in default) and `make test`.
# Both create ./.venv on first use and install the package with its test tools into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CXX ?= g++
# pyproject.toml's [build-system] requires, installed into the venv too: the package is built
# there without build isolation, so that rebuilding the native coder (and tests/test_packaging.py's
# wheel) needs no network. scikit-build-core names cmake and ninja as well when the machine lacks them.
BUILD_REQUIRES := "scikit-build-core>=0.10" "nanobind>=2.0"
NATIVE_SOURCES := CMakeLists.txt $(wildcard runtime/native/*)
SANITIZE_BUILD := build/sanitize

.PHONY: install photos demo test test-slow typecheck bench fuzz sanitize clean gpu-kit gpu-rehearsal test-gpu-image test-torch-newest

$(VENV)/.installed: pyproject.toml ci/constraints.txt ci/tensorrt_stubs.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(BUILD_REQUIRES)
	# setuptools and wheel: pip builds any dependency that comes as a source distribution without
	# build isolation too.
	$(BIN)/pip install -q $$($(BIN)/python -c "from scikit_build_core.build import get_requires_for_build_editable as r; print(' '.join(r()))") setuptools wheel
	# serve: PyTriton (its tritonserver) and tritonclient, for `osdiff serve`/`triton-repo` and their tests;
	# eval: the metric libraries of `osdiff eval`; calibrate: NVIDIA ModelOpt for `osdiff calibrate`
	$(BIN)/pip install -q -c ci/constraints.txt --no-build-isolation -e ".[test,serve,eval,calibrate]"
	# Type stubs of the TensorRT 10.13 Python API; --no-deps because its metadata asks for
	# the real tensorrt, which PyPI only has as a stub that downloads from NVIDIA.
	$(BIN)/pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	$(BIN)/python ci/tensorrt_stubs.py
	touch $@ $(VENV)/.native

# The editable install runs Python from the checkout but the extension from the venv: rebuild it
# when the C++ changes (build/<wheel tag> is kept, so only what changed recompiles).
$(VENV)/.native: $(NATIVE_SOURCES) | $(VENV)/.installed
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.native

demo: install
	$(BIN)/osdiff demo

# The built-in model's wallpaper photographs (training/wallpapers.py: two Debian packages, about
# 115 MB through apt-get, kept in $$OSDIFF_PHOTOS or ~/.cache/osdiff/wallpapers): its training data
# and most of its held-out set. Without them the held-out-set tests skip, saying why.
photos: install
	$(BIN)/python -m osdiff.training.wallpapers || echo "could not fetch the wallpaper photographs: their tests will be skipped" >&2

# CI's suite: everything but the tests marked slow (full-size models, subprocess matrices, servers,
# training), which `make test-slow` runs; run it before resolving an issue that touches them.
test: install photos
	$(BIN)/python -m pytest -q -m "not slow"
	$(MAKE) typecheck

test-slow: install photos
	$(BIN)/python -m pytest -q -m slow

typecheck: install
	$(BIN)/python -m mypy

# A longer fuzz than CI's 10,000 cases, with the default (native) coder.
fuzz: install
	$(BIN)/python tests/fuzz_streams.py --cases 200000

# The native coder built with AddressSanitizer and UndefinedBehaviorSanitizer (any report aborts),
# loaded in place of the installed one (OSDIFF_NATIVE_CODER), under the coder tests and a fuzz
# of 20,000 damaged streams. Python itself is not instrumented, so the ASan runtime is preloaded,
# with libstdc++ (else ASan cannot intercept C++ exceptions thrown from a library loaded later);
# pytest -s, so that a report is printed before the abort, not lost in pytest's capture.
sanitize: install
	PATH="$(abspath $(BIN)):$$PATH" cmake -S . -B $(SANITIZE_BUILD) -DOSDIFF_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	    -DCMAKE_CXX_COMPILER=$(CXX) -DPython_EXECUTABLE="$(abspath $(BIN)/python)" \
	    -Dnanobind_DIR="$$($(BIN)/python -m nanobind --cmake_dir)"
	PATH="$(abspath $(BIN)):$$PATH" cmake --build $(SANITIZE_BUILD)
	export OSDIFF_NATIVE_CODER="$$(ls $(abspath $(SANITIZE_BUILD))/_rans.*.so)" \
	    LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	    ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1; \
	$(BIN)/python -c "from osdiff.runtime.coder import native; assert native().sanitized; print('sanitized coder:', native().__file__)" && \
	$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_coder.py tests/test_entropy.py tests/test_latent_codec.py && \
	$(BIN)/python tests/fuzz_streams.py --cases 20000

# What the lent GPU machine lacks (wheels, the original implementation, golden checkpoints), in
# the git-ignored .gpu-kit/; prints the size of what travels. ORIGINAL: a checkout, bare git
# directory or URL of cheesejiang/OSDiff (default: cloned from GitHub).
gpu-kit:
	$(PYTHON) benchmarks/gpu_kit.py $(if $(ORIGINAL),--original $(ORIGINAL))

# The GPU check rehearsed on the CPU (demo config, small size): what CI runs in tests/test_gpu_check.py.
gpu-rehearsal: install
	OSDIFF_GPU_CHECK_DEVICE=cpu PYTHON=$(BIN)/python benchmarks/gpu_check.sh out/gpu-rehearsal

# Compatibility legs: the tests that exercise torch itself (export of every graph, torch.compile
# against eager, attention's forms, the cross-backend codec, the GPU check's rehearsal), each in a
# venv of its own with another Python stack. Not in CI (each venv is about 5 GB of torch with its
# CUDA libraries, downloaded once); run them before resolving anything that touches export,
# attention, the torch backend or the GPU check.
# - test-gpu-image: the lent GPU machine's stack (ci/gpu-image.txt: Python 3.12, torch 2.11,
#   numpy 2, onnx 1.23, onnxruntime 1.30), run on the CPU.
# - test-torch-newest: the newest torch pyproject.toml admits (ci/torch-newest.txt).
COMPAT_TESTS := tests/test_torch_versions.py tests/test_attention.py tests/test_onnx_export.py tests/test_codec.py tests/test_gpu_check.py
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)

.venv-%/.installed: ci/%.txt pyproject.toml $(NATIVE_SOURCES)
	$(if $(filter gpu-image,$*),$(PYTHON312),$(PYTHON)) -m venv .venv-$*
	# the machine's pip configuration caps torch (<= 2.14.1 here) and would refuse the stack under test
	PIP_CONFIG_FILE=/dev/null .venv-$*/bin/pip install -q -r ci/$*.txt
	# what the GPU kit carries (benchmarks/gpu_kit.py), without the dependencies the image has
	PIP_CONFIG_FILE=/dev/null .venv-$*/bin/pip install -q --no-deps $$($(PYTHON) benchmarks/gpu_kit.py --requirements)
	.venv-$*/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $@

test-gpu-image: .venv-gpu-image/.installed
	.venv-gpu-image/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

test-torch-newest: .venv-torch-newest/.installed
	.venv-torch-newest/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

clean:
	rm -rf $(VENV) .venv-gpu-image .venv-torch-newest build *.egg-info
