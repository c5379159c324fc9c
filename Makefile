# usermirror_nb: `make paper` runs the executable paper, `make test` checks it. Both install on first use.
PROFILE ?= quick
OVERRIDES ?=
VENV ?= .venv
PYTHON ?= python3
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
BIN := $(VENV)/bin
# the install stamp's name carries a hash of the packaging files: editing them re-installs
STAMP := $(VENV)/.installed-$(shell cat settings.ini setup.py pyproject.toml | sha256sum | cut -c1-12)
# pip here prints one harmless line per package for an extra index that does not exist; hide them (exit status kept)
QUIET_PIP := { grep -v "^WARNING: Location 'file:///opt/pypi.* is ignored" || true; }

.PHONY: help install paper test test-slow export clean lab readme recipe-study policy-study augment-study gpu-wheels gpu-check
help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install: $(STAMP)  ## create $(VENV) and install the project (torch CPU first); re-runs when settings.ini/setup.py change
$(STAMP):
	@start=$$(date +%s); \
	$(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP); \
	$(BIN)/pip install torch==2.13.0 2>&1 | $(QUIET_PIP); \
	$(BIN)/pip install -e ".[dev]" 2>&1 | $(QUIET_PIP); \
	$(BIN)/pip check; \
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (usermirror_nb)" >/dev/null; \
	rm -f $(VENV)/.installed-*; touch $@; \
	echo "install finished in $$(( $$(date +%s) - start )) s"

paper: install  ## run the stage notebooks with papermill for PROFILE (results/$(PROFILE)/)
	$(BIN)/usermirror-paper --profile $(PROFILE) --overrides "$(OVERRIDES)"

policy-study: install  ## recommenders in the loop (12_policies): 5 recommenders incl. SB3 PPO x 3 classic + 2 SmolLM2 simulators (hybrid, LLM; 40 users batched), replay metrics, Kendall tau -> results/policy_study/
	$(BIN)/usermirror-paper --profile quick --stages config,assets
	$(BIN)/python -c "from usermirror_nb.config import load_config; from usermirror_nb.policies import run_policy_study; run_policy_study(load_config('quick'))"

augment-study: install  ## simulator-labelled choices in SASRec's training data (13_augment): none / hybrid / LLM / item-kNN / random labels, replay on held-out users -> results/augment_study/
	$(BIN)/usermirror-paper --profile quick --stages config,assets
	$(BIN)/python -c "from usermirror_nb.config import load_config; from usermirror_nb.augment import run_augment_study; run_augment_study(load_config('quick'), llm_labels=150, sasrec_seeds=3)"

recipe-study: install  ## the recipe study (07b_recipe_study): scenes in results/study/, curves in results/recipe_study/ (variants without a result)
	$(BIN)/usermirror-paper --profile quick --overrides "profile=study,scenes.train_scenes=1000" --stages config,assets,scenes
	$(BIN)/python -c "from usermirror_nb.config import load_config; from usermirror_nb.recipe_study import run_recipe_study; \
	  run_recipe_study(load_config('quick', 'profile=study,scenes.train_scenes=1000'))"

GPU_WHEELS := trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.23.0 peft==0.21.2 fastcore==1.12.47
gpu-wheels: install  ## what a lent GPU machine lacks (wheels for its Python 3.12) + SmolLM2's tokenizer -> .gpu_wheels/ (~60 MB, carried there)
	rm -rf .gpu_wheels; mkdir -p .gpu_wheels
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu_wheels $(GPU_WHEELS) 2>&1 | $(QUIET_PIP)
	$(BIN)/python benchmarks/gpu_check.py --pack-tokenizer
	@du -sh .gpu_wheels

gpu-check:  ## on a CUDA machine, no install needed: nf4 QLoRA SFT -> DPO -> RosePO checks + a random 3B Llama QLoRA step's peak memory and s/step (benchmarks/gpu_check.py)
	$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) benchmarks/gpu_check.py

test: install  ## export is in sync, notebook tests (nbdev_test), pytest (not slow; gpu tests skip without CUDA)
	@tmp=$$(mktemp -d); cp -r usermirror_nb $$tmp/before; \
	$(BIN)/nbdev_export; \
	if ! diff -r -x __pycache__ $$tmp/before usermirror_nb; then rm -rf $$tmp; \
	  echo "ERROR: notebooks and usermirror_nb/ out of sync: commit the exported module (nbdev_export was just run)"; exit 1; fi; \
	rm -rf $$tmp; echo "nbdev_export: usermirror_nb/ is in sync with nbs/"
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest -q -rs tests -m "not slow"

test-slow: install  ## the slow tier: notebook demos marked `#| slow` (real training runs, ~3 min) and pytest -m slow
	$(BIN)/nbdev_test --n_workers 1 --flags slow
	$(BIN)/pytest -q -rs tests -m slow || [ $$? -eq 5 ]   # 5: no test is marked slow yet

export: install  ## notebooks -> usermirror_nb/
	$(BIN)/nbdev_export

clean: install  ## strip notebook metadata/outputs noise (keeps papermill's `parameters` tag)
	$(BIN)/nbdev_clean

readme: install  ## README.md from nbs/index.ipynb (nbdev_readme needs quarto; nbconvert otherwise)
	@if command -v quarto >/dev/null; then $(BIN)/nbdev_readme; \
	else $(BIN)/jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README --log-level WARN; fi

lab: install  ## JupyterLab on nbs/
	$(BIN)/jupyter lab --notebook-dir nbs
