# The two commands of the quick start are `make demo` and `make test`; each
# installs what is missing and starts the local stack first.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PYTEST_ARGS ?=
ONCE    ?=
# the recordings: a local copy, or PhysioNet's, downloaded and verified on first use
GAITPDB_DIR ?= $(CURDIR)/.stack/data/gaitpdb
export GAITPDB_DIR

.PHONY: install venv up down status test unit reliability demo clean lint data

$(VENV)/.installed: pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -m pip install --quiet --upgrade pip
	@echo "== installing Python dependencies (pyspark is large: the first time takes minutes)"
	@$(VPY) -m pip install --progress-bar on -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

install: venv
	@$(VPY) -m stack install

data: venv
	@test -n "$$(ls "$(GAITPDB_DIR)" 2>/dev/null | grep -m1 -E '\.txt(\.gz)?$$')" || \
	  $(VPY) -m ml.data download "$(GAITPDB_DIR)"

up: install
	@$(VPY) -m stack up

down:
	@test -x $(VPY) && $(VPY) -m stack down || true

status:
	@$(VPY) -m stack status

unit: venv
	@$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

test: up data
	@$(VPY) -m pytest $(PYTEST_ARGS)

# crashes, outages (stops shared services), fuzzing, security: also run by `make test`, last
reliability: up data
	@$(VPY) -m pytest tests/reliability $(PYTEST_ARGS)

demo: up data
	@$(VPY) -m stack.demo $(if $(ONCE),--once,)

lint: venv
	@$(VPY) -m ruff check .

clean: down
	rm -rf .stack $(VENV)
