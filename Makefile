# Two commands do all setup on a fresh machine: `make demo` and `make test`.
# Override the interpreter with PYTHON=/path/to/python3.12, the venv folder with VENV=...
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast install clean gpu-kit

$(STAMP): setup.py
	@interpreter=$$(tools/find_python312.sh) || exit 1; \
	  [ -x $(PY) ] || "$$interpreter" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# DeepSpeed (in the dev extra) without its compiled ops: it runs ZeRO and DeepSpeed-MoE on CPU
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

# Everything the offline GPU machine lacks (megatron-core, TE built for torch 2.11.0+cu130 / sm_90),
# in the ignored folder gpu-kit/; prints the device calls (see tools/gpu_kit.py, tools/gpu_check.sh).
gpu-kit:
	@interpreter=$$(tools/find_python312.sh) || exit 1; "$$interpreter" tools/gpu_kit.py $(GPU_KIT_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
