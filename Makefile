# archsae's front door. `make demo` and `make test` set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= vit
SAE    ?= ra
K      ?=
SEED   ?= 0
SEEDS  ?= 4
FIT    ?= $(RUNS)/fits/$(DATASET)-$(MODEL)-$(SAE)-seed$(SEED)
DATA   ?= demo
WEIGHTS ?= pretrained
RUNS   ?= runs
DATASET := $(if $(filter demo,$(DATA)),demo,$(basename $(notdir $(firstword $(subst {, ,$(DATA))))))
STORE  ?= $(RUNS)/$(DATASET)/$(MODEL)

.PHONY: venv demo extract info centroids fit stability test bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## demo: extract the bundled demo photos with a ViT-B/16 (pretrained if cached, else random); prints the store's summary
demo: venv
	$(BIN)/archsae extract --model vit --data demo --weights auto --out $(RUNS)/demo/vit

## extract: MODEL=dinov2|siglip|vit|convnext|resnet50|timm:<name> DATA=demo|folder|shards WEIGHTS=pretrained|random|auto|file
extract: venv
	$(BIN)/archsae extract --model $(MODEL) --data '$(DATA)' --weights $(WEIGHTS) --out $(STORE)

info: venv
	$(BIN)/archsae info $(STORE)

## centroids: K-means archetype points of a store (K=32000 by default, as in the paper)
centroids: venv
	$(BIN)/archsae centroids $(STORE) --k $(or $(K),32000)

## fit: SAE=ra|a|topk|batchtopk|jumprelu|relu on the store of MODEL/DATA; centroids (K, default min(32000, tokens/4)) are computed when missing
fit: venv
	$(BIN)/archsae fit $(STORE) --sae $(SAE) --seed $(SEED) --out $(FIT) $(if $(K),--n-centroids $(K)) $(FIT_ARGS)

## stability: SEEDS runs of SAE and of its controls (TopK random init, TopK at centroids, no projection); SUBSETS=1 varies the data instead
stability: venv
	$(BIN)/archsae stability-study $(STORE) --sae $(SAE) --seeds $(SEEDS) --out $(RUNS)/stability/$(DATASET)-$(MODEL)-$(SAE)$(if $(SUBSETS),-subsets) $(if $(SUBSETS),--subsets) $(FIT_ARGS)

test: venv
	$(BIN)/python -m pytest

REFERENCE := .bench/reference
$(REFERENCE)/.installed:
	$(BIN)/pip install --quiet --no-deps --target $(REFERENCE) overcomplete==0.3.0 einops opencv-python-headless 'matplotlib<3.9'
	touch $@

bench: venv $(REFERENCE)/.installed
	test -d $(RUNS)/demo/vit || $(MAKE) demo
	$(BIN)/python -m benchmarks.extract
	$(BIN)/python -m benchmarks.loader
	$(BIN)/python -m benchmarks.codecs
	$(BIN)/python -m benchmarks.fit_loader
	$(BIN)/python -m benchmarks.ra_step
	$(BIN)/python -m benchmarks.demo_fit

clean:
	rm -rf $(VENV) $(RUNS) .bench
