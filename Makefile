# Two commands do all setup on a fresh machine: `make demo` and `make test`.
# Override the interpreter with PYTHON=/path/to/python3.12, the venv folder with VENV=...
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast install clean

$(STAMP): setup.py
	@interpreter=$$(tools/find_python312.sh) || exit 1; \
	  [ -x $(PY) ] || "$$interpreter" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
