# The two set-up commands of the README. Each installs what it needs first
# (install.sh is idempotent: seconds when the environment is up to date).
PY := .venv/bin/python

.PHONY: install quickstart test test-fast configs

install:
	bash install.sh

quickstart: install
	$(PY) tools/quickstart.py

test: install
	$(PY) -m pytest -q -n 2

test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow"

configs:
	$(PY) tools/generate_configs.py
