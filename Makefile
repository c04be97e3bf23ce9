# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make demo   -> installs what is missing into .venv/ and starts the app on the demo model
#   make test   -> installs what is missing into .venv/ and runs the tests
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.photon-installed
HOST    ?= 127.0.0.1
PORT    ?= 7860
APP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test setup clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) app.py --host $(HOST) --port $(PORT) $(APP_ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache artifacts
