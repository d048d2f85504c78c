# The two set-up commands of the README. Each installs what it needs first
# (install.sh is idempotent: seconds when the environment is up to date).
# The environment install.sh chose (an activated venv or conda env, $PVT_D2_VENV, else ./.venv): one owner, install.sh.
PY := $(shell bash install.sh --print-python)

.PHONY: install quickstart test test-slow test-all configs

install:
	bash install.sh

# ARGS: config overrides for the quickstart, e.g. make quickstart ARGS="SOLVER.MAX_ITER 600"
quickstart: install
	$(PY) tools/quickstart.py $(ARGS)

# The README's test command: the suite without the tests marked slow.
test: install
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

# The tests marked slow (longer training runs, every config, large exports); CI runs them after `make test`.
test-slow: install
	$(PY) -m pytest -q -n 2 -m slow $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -n 2

configs:
	$(PY) tools/generate_configs.py
	$(PY) tools/generate_lazy_configs.py
