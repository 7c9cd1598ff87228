# spp_jax: every target runs inside a project-local virtualenv that `make` creates
# and fills from requirements.txt (re-installed whenever requirements.txt changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

MODEL   ?= overfeat7
ARGS    ?=

.PHONY: setup test train eval table2 bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
