# The two commands of the quick start are `make demo` and `make test`; each
# installs what is missing and starts the local stack first.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PYTEST_ARGS ?=
ONCE    ?=

.PHONY: install venv up down status test unit demo bench clean lint

$(VENV)/.installed: pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -m pip install --quiet --upgrade pip
	@echo "== installing Python dependencies (pyspark is large: the first time takes minutes)"
	@$(VPY) -m pip install --progress-bar on -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

install: venv
	@$(VPY) -m stack install

up: install
	@$(VPY) -m stack up

down:
	@test -x $(VPY) && $(VPY) -m stack down || true

status:
	@$(VPY) -m stack status

unit: venv
	@$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

test: up
	@$(VPY) -m pytest $(PYTEST_ARGS)

demo: up
	@$(VPY) -m stack.demo $(if $(ONCE),--once,)

lint: venv
	@$(VPY) -m ruff check .

clean: down
	rm -rf .stack $(VENV)
