# hd - Hybrid Distillation toolkit. `make test` and `make demo` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test lint clean

install: $(STAMP)

# torch/torchvision pinned to the releases this machine installs from local disk; pyproject admits them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# the optional extras (Transformers and OpenCLIP teachers) are installed for the tests, which cover them
EXTRAS := $(VENV)/.extras
$(EXTRAS): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,hf,openclip]"
	touch $(EXTRAS)

test: install $(EXTRAS)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check hdcli tests

# The paper's tables (docs/reproduce.md): make reproduce-table1 DATA_IN1K=DIR [DATA_IN21K GPUS NODES OUT];
# reproduce-table2 also reads DATA_CIFAR, DATA_CARS, DATA_INAT. DRY_RUN=1 prints the plan with GPU-hours;
# SCALE=smoke runs the same chain with tiny models on the demo data (CPU, about a minute or two).
REPRODUCE_ARGS = $(if $(OUT),--out "$(OUT)") $(if $(SCALE),--scale $(SCALE)) \
	$(if $(filter-out 0 no false,$(DRY_RUN)),--dry-run) $(if $(GPUS),--gpus $(GPUS)) $(if $(NODES),--nodes $(NODES)) \
	$(if $(DATA_IN1K),--data-in1k "$(DATA_IN1K)") $(if $(DATA_IN21K),--data-in21k "$(DATA_IN21K)") \
	$(if $(DATA_CIFAR),--data-cifar "$(DATA_CIFAR)") $(if $(DATA_CARS),--data-cars "$(DATA_CARS)") \
	$(if $(DATA_INAT),--data-inat "$(DATA_INAT)") $(if $(MAE_IN100),--mae-in100 "$(MAE_IN100)") \
	$(if $(BENCH),--bench "$(BENCH)") $(if $(DETECTRON2_DIR),--detectron2-dir "$(DETECTRON2_DIR)") \
	$(if $(MMSEG_DIR),--mmseg-dir "$(MMSEG_DIR)") $(if $(RUNS),--only "$(RUNS)")

# reproduce-figures: the paper's Figures 1-3 (Sec. 2: decoders, mask feature reconstruction, FD's student), with
# DATA_IN1K; the same DRY_RUN=1 and SCALE=smoke modes; figure1.png .. figure3.png in OUT/figures.
.PHONY: reproduce-table1 reproduce-table2 reproduce-ablations reproduce-figures
reproduce-table1 reproduce-table2 reproduce-ablations reproduce-figures: install
	$(BIN)/python -m hdcli reproduce $(patsubst reproduce-%,%,$@) $(REPRODUCE_ARGS)

# The main job (docs/demo.md): two tiny teachers, a hybrid-distilled student, probes, analysis, report
# (< 10 min on 2 CPU cores, offline). OUT=DIR to write elsewhere; re-running skips finished stages.
.PHONY: demo mini-study
demo: install
	$(BIN)/python -m hdcli demo --out "$(or $(OUT),runs/demo)"

# The mini study (docs/mini-study.md; about 25 min on 2 cores): Fashion-MNIST from Debian's
# dataset-fashion-mnist package, installed here when its files are missing and apt-get may run.
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
mini-study: install
	@test -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" || test -f "$(FMNIST_DIR)/train-images-idx3-ubyte" \
		|| apt-get install -y dataset-fashion-mnist || sudo -n apt-get install -y dataset-fashion-mnist \
		|| echo "warning: could not install dataset-fashion-mnist; hd will name what is missing"
	$(BIN)/python -m hdcli demo --study --data "fashion-mnist:$(FMNIST_DIR)" --out "$(or $(OUT),runs/mini-study)"

clean:
	rm -rf $(VENV) build *.egg-info hdcli/*.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
