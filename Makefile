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

REPORT ?= report
DEMO   := $(RUNS)/demo
# the demo's dictionaries: small enough for 2 CPU cores in minutes
DEMO_FIT := --concepts 256 --top-k 16 --n-centroids 512 --epochs 5

.PHONY: venv browser-deps demo extract info centroids fit evaluate stability baselines identifiability plausibility report browse test test-fast bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## demo: the whole pipeline on the bundled photos (ViT-B/16, pretrained if cached, else random): extract, SAEs with
## their controls over seeds and data subsets, baselines, both benchmarks, the concept browser of RA-SAE
## ($(DEMO)/browser/index.html) and the report linking to it ($(REPORT)/index.md)
demo: venv
	$(BIN)/archsae extract --model vit --data demo --weights auto --out $(DEMO)/vit
	$(BIN)/archsae stability-study $(DEMO)/vit --sae ra,a,jumprelu,relu --seeds 3 --out $(DEMO)/study-seeds $(DEMO_FIT)
	$(BIN)/archsae stability-study $(DEMO)/vit --sae ra,a --seeds 2 --subsets --out $(DEMO)/study-subsets $(DEMO_FIT)
	$(BIN)/archsae baselines $(DEMO)/vit --concepts 256 --sample 4096 --json $(DEMO)/baselines.json
	$(BIN)/archsae bench identifiability --model vit --weights auto --collages 200 --out $(DEMO)/identifiability
	$(BIN)/archsae bench plausibility --model vit --weights auto --store $(DEMO)/vit --sizes 64,256 --deltas 0,1 \
		--epochs 5 --n-centroids 512 --out $(DEMO)/plausibility
	$(BIN)/archsae browse $(DEMO)/study-seeds/ra/run0 --against $(DEMO)/study-seeds/ra/run1 --out $(DEMO)/browser
	$(BIN)/archsae report --out $(REPORT) --study $(DEMO)/study-seeds --study $(DEMO)/study-subsets \
		--baselines $(DEMO)/baselines.json --identifiability $(DEMO)/identifiability/identifiability.json \
		--plausibility $(DEMO)/plausibility/plausibility.json --browser $(DEMO)/browser

## extract: MODEL=dinov2|siglip|vit|convnext|resnet50|timm:<name> DATA=demo|folder|shards WEIGHTS=pretrained|random|auto|file
extract: venv
	$(BIN)/archsae extract --model $(MODEL) --data '$(DATA)' --weights $(WEIGHTS) --out $(STORE)

info: venv
	$(BIN)/archsae info $(STORE)

## centroids: K-means archetype points of a store's train split (K, default min(32000, train tokens / 4), as in the paper)
centroids: venv
	$(BIN)/archsae centroids $(STORE) $(if $(K),--n-centroids $(K))

## fit: SAE=ra|a|topk|batchtopk|jumprelu|relu on the store of MODEL/DATA; centroids (K, default min(32000, tokens/4)) are computed when missing
fit: venv
	$(BIN)/archsae fit $(STORE) --sae $(SAE) --seed $(SEED) --out $(FIT) $(if $(K),--n-centroids $(K)) $(FIT_ARGS)

## evaluate: every metric of FIT on its held-out split (FIT=path of a fit directory)
evaluate: venv
	$(BIN)/archsae evaluate $(FIT) --json $(FIT)/evaluation.json

## stability: SEEDS runs of SAE and of its controls (TopK random init, TopK at centroids, no projection); SUBSETS=1 varies the data instead
stability: venv
	$(BIN)/archsae stability-study $(STORE) --sae $(SAE) --seeds $(SEEDS) --out $(RUNS)/stability/$(DATASET)-$(MODEL)-$(SAE)$(if $(SUBSETS),-subsets) $(if $(SUBSETS),--subsets) $(FIT_ARGS)

## baselines: PCA, ICA, sparse PCA, K-means, Semi-NMF, Convex-NMF on the store, K atoms (default 5 x d, at most d for linear ones)
baselines: venv
	$(BIN)/archsae baselines $(STORE) --concepts $(or $(K),3840) --json $(RUNS)/baselines/$(DATASET)-$(MODEL).json

## identifiability / plausibility: the paper's two benchmarks for MODEL with WEIGHTS
identifiability: venv
	$(BIN)/archsae bench identifiability --model $(MODEL) --weights $(WEIGHTS) --out $(RUNS)/identifiability/$(MODEL)

plausibility: venv
	$(BIN)/archsae bench plausibility --model $(MODEL) --weights $(WEIGHTS) $(if $(wildcard $(STORE)/zarr.json),--store $(STORE)) --out $(RUNS)/plausibility/$(MODEL)

## browse: a static site of FIT's concepts (open $(FIT)-browser/index.html from disk)
browse: venv
	$(BIN)/archsae browse $(FIT) --out $(FIT)-browser

## report: gather what exists for MODEL/DATA into $(REPORT)
report: venv
	$(BIN)/archsae report --out $(REPORT) $(foreach s,$(wildcard $(RUNS)/stability/$(DATASET)-$(MODEL)-*),--study $(s)) \
		$(if $(wildcard $(RUNS)/baselines/$(DATASET)-$(MODEL).json),--baselines $(RUNS)/baselines/$(DATASET)-$(MODEL).json) \
		$(if $(wildcard $(RUNS)/identifiability/$(MODEL)/identifiability.json),--identifiability $(RUNS)/identifiability/$(MODEL)/identifiability.json) \
		$(if $(wildcard $(RUNS)/plausibility/$(MODEL)/plausibility.json),--plausibility $(RUNS)/plausibility/$(MODEL)/plausibility.json)

# the browser test drives Debian's headless Chromium
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test: venv browser-deps
	$(BIN)/python -m pytest

## test-fast: the tests that stay in this process (no kills, torchrun or browser)
test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

REFERENCE := .bench/reference
$(REFERENCE)/.installed:
	$(BIN)/pip install --quiet --no-deps --target $(REFERENCE) overcomplete==0.3.0 einops opencv-python-headless 'matplotlib<3.9'
	touch $@

bench: venv $(REFERENCE)/.installed
	$(BIN)/archsae info $(RUNS)/demo/vit >/dev/null 2>&1 || $(MAKE) demo
	$(BIN)/python -m benchmarks.extract
	$(BIN)/python -m benchmarks.loader
	$(BIN)/python -m benchmarks.codecs
	$(BIN)/python -m benchmarks.fit_loader
	$(BIN)/python -m benchmarks.ra_step
	$(BIN)/python -m benchmarks.demo_fit --store $(RUNS)/demo/vit

clean:
	rm -rf $(VENV) $(RUNS) .bench $(REPORT)
