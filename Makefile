# Two commands for a newcomer: `make demo` and `make test`. Both create .venv, install what they
# need (system packages too, when run as root) and are idempotent: the second run is fast.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := $(CURDIR)/data
export DAGSTER_HOME ?= $(DATA)/dagster_home
SYSTEM_PACKAGES := espeak-ng sox chromium prometheus redis-server
DEMO_CORPUS_ARGS := --subsets dev-clean,train-clean-100 --speakers 4 --utts-per-speaker 8 --seed 0 --with-broken

.PHONY: demo demo-voice test ui venv sysdeps postgres triton-server lint bench clean

venv: $(STAMP)

# python3 -m venv needs Debian's python3-venv; install it when missing and we may.
$(STAMP): pyproject.toml
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv; \
	  else echo "python3-venv is missing: run  sudo apt-get install -y python3-venv" && exit 1; fi; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# espeak-ng gives the synthetic corpus real (synthetic) speech; sox is handy for inspecting it;
# chromium (headless) is what the UI test drives. Without root we print the command and carry on:
# the corpus generator has a built-in fallback and the browser test skips without chromium.
sysdeps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing$$missing" && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing system packages:$$missing -- run:  sudo apt-get install -y$$missing  (continuing with the fallback synthesiser)"; fi; fi

# PostgreSQL on 127.0.0.1 for the instance tests, and PgBouncer for the control-plane test (installed
# from Debian packages and started when missing; needs root, otherwise it prints the command and the
# PostgreSQL tests skip).
postgres:
	.ci/postgres --with-pgbouncer

# Queued runs, op-granularity pools, run monitoring (pipelines/instance.py); kept when it exists.
$(DAGSTER_HOME)/dagster.yaml: | venv
	$(BIN)/python -m pipelines.instance --home $(DAGSTER_HOME)

demo: venv sysdeps $(DAGSTER_HOME)/dagster.yaml
	@if [ "$$(cat $(DATA)/LibriTTS/.demo-args 2>/dev/null)" != "$(DEMO_CORPUS_ARGS)" ]; then \
	  rm -rf $(DATA)/LibriTTS && $(BIN)/cosyvoice-pipeline make-synthetic-corpus --out $(DATA)/LibriTTS $(DEMO_CORPUS_ARGS) \
	  && echo "$(DEMO_CORPUS_ARGS)" > $(DATA)/LibriTTS/.demo-args; \
	else echo "synthetic corpus: up to date ($(DATA)/LibriTTS)"; fi
	$(BIN)/cosyvoice-pipeline make-reference-models --out $(DATA)/models 2>&1 | grep -v -E '^\[torch.onnx\]|torchvision'
	$(BIN)/python -m pipelines.demo dev-clean train-clean-100 2>&1 | grep -E '^materialized|failed|Error' 
	@echo
	@echo "Outputs:"
	@echo "  corpus            $(DATA)/LibriTTS/{dev-clean,train-clean-100}"
	@echo "  reference models  $(DATA)/models/{campplus,speech_tokenizer_v1,speech_tokenizer_v2,speech_tokenizer_v2.batch}.onnx,"
	@echo "                    $(DATA)/models/{flow.pt,hift.pt,cosyvoice2.yaml} (the acoustic model dir)"
	@echo "  manifests         $(DATA)/manifest/<subset>/{wav.scp,text,utt2spk,spk2utt,shards.json,quarantine.tsv,*.pt}"
	@echo "  features          $(DATA)/{speaker_embeddings,speech_tokens}/<subset>/<shard>.parquet, $(DATA)/speaker_means/"
	@echo "  training shards   $(DATA)/parquet/<subset>/parquet_*.tar, $(DATA)/{train,cv}.data.list"
	@echo "  Dagster instance  $(DAGSTER_HOME)"
	@echo "Open the Dagster UI with:  make ui   (then http://127.0.0.1:3000)"

# After the data stages: the tiny LLM, flow and HiFT trained a few steps each on the CPU, their averages, the HF
# export and a Triton repository made of those weights (CPU channel), pulled and made to speak one sentence.
demo-voice: demo
	$(BIN)/python -m pipelines.demo_voice --out $(DATA)/demo 2>&1 | grep -E '^materialized|^published|^spoke|^  cosyvoice|failed|Error'
	@echo "  voice             $(DATA)/demo/voice.wav (pulled repository: $(DATA)/demo/served)"

test: venv sysdeps postgres triton-server
	$(BIN)/python -m pytest -q --durations=25

# The pool limit (COSYVOICE_GPU_POOL_LIMIT, default 1) is applied on every start.
ui: venv $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m pipelines.instance --home $(DAGSTER_HOME)
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# The CPU tritonserver the Triton tests and `publish`'s load test run (nvidia-pytriton's binary +
# python backend in its own numpy-1.26 venv below .venv, chained to .venv's packages). The only
# place it is built (pip; apt-get for libpython3.X as root): library code never installs anything
# and says to run this target. Idempotent: a built environment is checked and kept (about 1 s).
triton-server: venv
	@lib=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_config_var("INSTSONAME"))'); \
	pkg=libpython$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	if ! ldconfig -p | grep -q "$$lib" && [ ! -e "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')/$$lib" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing $$pkg" && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkg >/dev/null; \
	  else echo "$$lib is missing: run  sudo apt-get install -y $$pkg" && exit 1; fi; fi
	$(BIN)/cosyvoice-pipeline triton-server-env

lint: venv
	$(BIN)/ruff check cosyvoice assets pipelines tests bench

bench: venv sysdeps
	$(BIN)/python bench/manifest.py

clean:
	rm -rf $(DATA) .pytest_cache
