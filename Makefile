# Two entry points, each doing its own set-up from scratch on a fresh machine with Python 3.11:
#   make book   - build the book on the organism (executes every notebook) -> _build/html/index.html
#   make test   - the whole test suite (unit tests, notebooks under nbmake, book build, browser test)
#   make test-fast - the fast subset to run before every commit (< 2 min on 2 cores): unit tests on tiny
#                 models, without notebooks, browser, wheel build, launched processes or training
#                 (pytest -m "not heavy"; the table is in tests/conftest.py)
# FULL=1 switches notebooks and tests to the big settings.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup book test test-fast clean

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[book,test]"
	touch $@

setup: $(VENV)/.installed

book: setup
	$(PY) -m mabook.book build

test: setup
	$(PY) -m mabook.book test

test-fast: setup
	$(PY) -m pytest -p no:cacheprovider -q -m "not heavy" --durations=5 tests

clean:
	rm -rf _build
