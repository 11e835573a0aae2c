# Every target sets itself up: the venv is (re)built when pyproject.toml or the installer changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fpsa-installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(STAMP)

## Train the embedded tiny default on CPU (or GPU when present).
demo: $(STAMP)
	$(PY) -m fpsa_train +experiment=tiny

## The CPU test suite (what CI runs). Slow and GPU tests are excluded; `make test-all` runs the slow ones too.
test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow and not deepspeed"

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not deepspeed"

clean:
	rm -rf $(VENV) outputs .pytest_cache
