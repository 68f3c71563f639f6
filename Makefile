# The two commands of the README: `make demo` (the main job: training) and `make test` (the suite).
# Both create .venv on first use; nothing else needs installing by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moekit-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml tools/bootstrap.sh
	tools/bootstrap.sh $(VENV) dev
	@touch $(STAMP)

# The main job: train tiny-moe on the built-in corpus (Python's standard library source) for
# a bounded time, then print the final validation loss and a routing summary and write
# runs/demo-tiny-moe/loss.png. The first run also tokenizes the corpus (about a minute, then cached).
DEMO_MINUTES ?= 4
DEMO_PRESET ?= tiny-moe
demo: $(STAMP)
	$(PY) -m moekit train --preset $(DEMO_PRESET) --time-budget $(DEMO_MINUTES) --out runs/demo-$(DEMO_PRESET) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
