# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pip's own find-links warnings on these machines are noise; errors still show.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install dev browser lint bench clean

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
dev: $(VENV)/.installed-dev browser

# The report tests open pages in Debian's Chromium (tests/browser.py). Install it where we are
# root with apt-get; elsewhere those tests skip and say why. A failed install is not fatal.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "note: chromium not installed; browser tests will skip"; }

demo: install
	$(PY) launchers/demo.py

test: dev
	$(VENV)/bin/ruff check mmfm moe data encoders tests bench launchers
	$(PY) -m pytest -q

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
