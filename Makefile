# Two commands matter: `make demo` (the main job) and `make test` (the suite). Both create
# .venv with Python 3.12 and install the pinned dependencies first, if that has not happened.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# python3.12 from PATH; pyenv keeps it off PATH unless selected, so look there too.
PYTHON ?= $(shell for p in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12); do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
INSTALLED := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MUJOCO_GL ?= egl
export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_UPDATE_CHECK ?= 1

.PHONY: install test lint demo bench lock clean

$(INSTALLED): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: python3.12 not found on PATH (set PYTHON=/path/to/python3.12)" >&2; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(INSTALLED)

lint: $(INSTALLED)
	$(BIN)/ruff check agent hub shared bench cli tests
	$(BIN)/ruff format --check agent hub shared bench cli tests
	@# mypy cannot follow the zk0.* -> folder mapping of the editable install: show it the tree.
	@mkdir -p .cache/typecheck/zk0 && for p in agent hub shared bench cli; do ln -sfn ../../../$$p .cache/typecheck/zk0/$$p; done
	MYPYPATH=.cache/typecheck $(BIN)/mypy -p zk0.agent -p zk0.hub -p zk0.shared -p zk0.bench -p zk0.cli

test: lint
	$(BIN)/pytest $(ARGS)

demo: $(INSTALLED)
	$(BIN)/zk0 demo $(ARGS)

bench: $(INSTALLED)
	$(BIN)/zk0 bench policy --json outputs/bench/policy.json $(ARGS)

lock: $(INSTALLED)
	( sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^zk0' ) > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .cache outputs .mypy_cache .ruff_cache .pytest_cache
