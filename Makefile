# Two commands set up everything: `make book` and `make test`.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test install lint unit notebooks site refresh clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

book: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --keep-going

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

notebooks: $(STAMP)
	$(BIN)/python -m pytest --nbval notebooks -q -p no:cacheprovider

# Tests of the built site (run `make book` first): internal links offline, then every page in
# headless Chromium, with screenshots in _build/screenshots/. Chromium is installed where we are
# root with apt-get (as on CI); elsewhere the browser test is skipped with a message.
site: $(STAMP)
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || exit 1; \
	  else \
	    echo "NOTE: /usr/bin/chromium is missing and cannot be installed here (that needs root and apt-get):"; \
	    echo "      the browser test will be skipped. Install it with: sudo apt-get install chromium"; \
	  fi; \
	fi
	$(BIN)/python -m pytest site_tests -q -p no:cacheprovider -rs

# ruff: lint rules and formatting (pyproject.toml) over the code and the notebooks' cells
lint: $(STAMP)
	$(BIN)/ruff check ttt_helpers tests site_tests benchmarks notebooks
	$(BIN)/ruff format --check ttt_helpers tests site_tests benchmarks notebooks

test: lint unit notebooks book site

# Re-execute notebooks in place and store their outputs: `make refresh` (all) or
# `make refresh NB=notebooks/01_ttt_layer_from_scratch.ipynb` (one).
NB ?= notebooks/*.ipynb
refresh: $(STAMP)
	for nb in $(NB); do \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 "$$nb" || exit 1; \
	done

clean:
	rm -rf _build
