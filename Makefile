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

# The engine benchmark on this machine (a script that prints numbers; not part of the tests).
bench: install
	bash benchmarks/install_bench_deps.sh
	$(BIN)/python benchmarks/bench_engine.py --model tiny.en --warmup-s 60 --runs 1 \
		--audio ../shared/audio/longform/english_read_mix_concat.flac

clean:
	rm -rf $(VENV) build *.egg-info
