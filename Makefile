# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pip's own find-links warnings on these machines are noise; errors still show.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install dev lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import mmfm, torch, tokenizers, webdataset" 
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import mmfm, torch, tokenizers, webdataset, transformers, pytest"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/mmfm demo

test: dev
	$(VENV)/bin/ruff check mmfm moe data encoders tests bench
	$(PY) -m pytest -q

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
