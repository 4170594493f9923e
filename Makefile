# The README's two set-up commands: `make run` and `make test`. Each installs first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SAMPLES := tests/data/samples

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV)
	touch $(STAMP)

# The main job end to end on embedded defaults: SQLite, an embedded Valkey, the bundled model.
run: install
	$(BIN)/archive-asr run $(SAMPLES)

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
