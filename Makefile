# The two set-up commands of the README: `make book` builds the book, `make test` runs every test.
# Both create .venv and install the pinned requirements on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: book test unit notebooks

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

book: $(VENV)/.installed
	$(VENV)/bin/jupyter-book build . -W
	@echo "The book is at _build/html/index.html"

unit: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 -q

notebooks: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest --nbval-lax --nbval-current-env notebooks -n 2 --dist loadfile -q

test: unit notebooks
	$(VENV)/bin/jupyter-book build . -W
