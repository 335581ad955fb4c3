PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow docs docs-images clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,plot,docs]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/moa explain examples/causal.moa
	$(BIN)/moa check examples/causal.moa --dims n=100,d=16,e=16
	$(BIN)/moa cost examples/causal.moa --dims n=8192,d=128,e=128 --dtype bf16 --device h100

test: $(STAMP)
	$(BIN)/ruff check moa frontend codegen runtime cli tests benchmarks
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet   # a broken link or anchor in docs/ fails
	$(BIN)/python -m pytest -q -n 2 tests

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict   # the site, in build/site

docs-images: $(STAMP)
	$(BIN)/python docs/images.py   # the tile maps and the cost plot of docs/ (committed PNGs)

test-slow: $(STAMP)
	MOA_SLOW=1 $(BIN)/python -m pytest -q -n 2 tests -m slow

clean:
	rm -rf $(VENV) build *.egg-info
