# `make demo` and `make test` each set up .venv on first use (torch pinned to the CPU build on
# this disk, see constraints.txt) and skip the install when the requirements have not changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastvader-installed
REQS   := requirements.txt requirements-dev.txt constraints.txt setup.py pyproject.toml

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# the demo trains, then compares the aligned model with the base one on the validation prompts
# (reward, shape and background kept: runs/demo/alignment.json)
demo: $(STAMP)
	$(VENV)/bin/fastvader train --config configs/demo.yaml --overwrite
	$(PY) -m fastvader.toy.quality --run runs/demo

test: $(STAMP)
	$(VENV)/bin/pytest -q -ra

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/pytest benchmarks -q --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info
