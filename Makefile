# Every target sets itself up: the venv is (re)built when pyproject.toml, the lock or the installer changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fpsa-installed

.PHONY: demo test test-all install lock clean

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(STAMP)

## Re-pin every dependency (constraints.txt) to what the registries serve today; then `make test` and commit it.
lock:
	bash scripts/lock.sh

DEMO ?= outputs/demo
DEMO_PROMPT ?= a red circle moving left quickly on a dark blue background
# The evaluation's seeds (FPS against dense, same initial noise, 25 sampling steps); the sample uses seed 0 and 50.
DEMO_SEEDS ?= [0,1,2,3]
# Overrides appended to the demo's training and sampling commands (empty: the full demo). `make docs-check` passes
# tiny ones, e.g. DEMO_TRAIN_ARGS="trainer.max_steps=2" DEMO_SAMPLE_ARGS="steps=2" DEMO_EVAL_ARGS="steps=2".
DEMO_TRAIN_ARGS ?=
DEMO_SAMPLE_ARGS ?=
DEMO_EVAL_ARGS ?=

## Fine-tune the shipped demo base (assets/demo_base) with FPS attention on the CPU, export it, sample the demo prompt
## (the analyzer's verdict is printed next to the mp4 and PNG), and measure FPS against dense on a few seeds.
demo: $(STAMP)
	$(PY) -m fpsa_train +experiment=demo hydra.run.dir=$(DEMO)/train $(DEMO_TRAIN_ARGS)
	$(PY) -m fpsa_train.export checkpoint=$(DEMO)/train/checkpoints/last.ckpt out=$(DEMO)/deploy overwrite=true \
		hydra.run.dir=$(DEMO)/export
	$(PY) -m fpsa_train.sample deploy=$(DEMO)/deploy prompt="$(DEMO_PROMPT)" out=$(DEMO)/samples name=demo \
		hydra.run.dir=$(DEMO)/sample $(DEMO_SAMPLE_ARGS)
	printf '%s\n' "$(DEMO_PROMPT)" > $(DEMO)/prompt.txt
	$(PY) -m fpsa_train.evaluate "candidates=[$(DEMO)/deploy]" reference=dense prompts=$(DEMO)/prompt.txt \
		"seeds=$(DEMO_SEEDS)" steps=25 out=$(DEMO)/eval hydra.run.dir=$(DEMO)/eval $(DEMO_EVAL_ARGS)

## The CPU test suite (what CI runs). Slow, DeepSpeed and GPU tests are excluded; `make test-all` adds the slow
## and DeepSpeed ones (ZeRO-3 on two CPU ranks: ~5 min).
test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow and not deepspeed"

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

## Run every command of README.md's bash and python blocks on CPU with tiny inputs, as CI does after `make test`
## (scripts/docs_check.py: prints a table of the commands and their results; a few minutes).
.PHONY: docs-check
docs-check: $(STAMP)
	$(PY) scripts/docs_check.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
