# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both create .venv on first use; nothing else needs installing by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moekit-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml tools/bootstrap.sh
	tools/bootstrap.sh $(VENV) dev
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m moekit demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
