# archsae's front door. `make demo` and `make test` set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= vit
DATA   ?= demo
WEIGHTS ?= pretrained
RUNS   ?= runs
DATASET := $(if $(filter demo,$(DATA)),demo,$(basename $(notdir $(firstword $(subst {, ,$(DATA))))))
STORE  ?= $(RUNS)/$(DATASET)/$(MODEL)

.PHONY: venv demo extract info test bench clean

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

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m benchmarks.extract
	$(BIN)/python -m benchmarks.loader
	$(BIN)/python -m benchmarks.codecs

clean:
	rm -rf $(VENV) $(RUNS)
