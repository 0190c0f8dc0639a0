# Two commands set up a fresh machine: `make demo` (main job) and `make test`.
# Each creates the virtual environment on first use. torch 2.13.0 is installed
# first and pinned so pip takes the local CPU wheel instead of the CUDA stack.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: venv demo test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/reclip demo --out demo_out

test: venv
	$(PY) -m pytest -q

bench: venv
	$(VENV)/bin/reclip bench

clean:
	rm -rf $(VENV) demo_out .pytest_cache
