# The README's quick start is `make run` and `make test`; both install what is missing.
VENV    ?= .venv
PY      := $(VENV)/bin/python
RUN_DIR ?= $(CURDIR)/.run
# Empty turns the driver's /metrics and /healthz off.
METRICS_ADDRESS ?= 127.0.0.1:9808
STAMP   := $(VENV)/.installed

.PHONY: run test test-quick proto bench bench-quick image clean

# A venv whose python is gone is made again even when its stamp looks fresh;
# install.sh also remakes one that is half-made (no stamp, python or pip broken).
ifeq ($(wildcard $(PY)),)
$(STAMP): reinstall
endif
.PHONY: reinstall
reinstall:

$(STAMP): pyproject.toml scripts/install.sh
	scripts/install.sh system-test
	scripts/install.sh venv $(VENV) dev
	touch $@

## run: start the driver locally (all services, embedded fusefs) on unix://$(RUN_DIR)/csi.sock
run: $(STAMP)
	mkdir -p $(RUN_DIR)/data $(RUN_DIR)/kubelet
	$(VENV)/bin/fusepath-csi --mode=all --fusefs=embedded \
	    --endpoint=unix://$(RUN_DIR)/csi.sock --data-dir=$(RUN_DIR)/data \
	    --kubelet-dir=$(RUN_DIR)/kubelet --metrics-address=$(METRICS_ADDRESS) --log-format=text

## test: the whole suite; privileged tests run when root (FUSEPATH_REQUIRE_PRIVILEGED=1 makes a skip fail)
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

## proto: regenerate the committed gRPC stubs from proto/*.proto
proto: $(STAMP)
	$(PY) -m csi_driver.protogen

bench: $(STAMP)
	$(PY) bench/run.py

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick

CONTAINER_ENGINE ?= docker
IMAGE ?= ghcr.io/fusepath/fusepath:v0.1.0

## image: build the one image both entry points run from (needs a container engine)
image:
	$(CONTAINER_ENGINE) build -t $(IMAGE) .

## clean: delete .venv and .run; unmounts what is mounted under them first, and refuses while a driver runs
clean:
	python3 scripts/clean.py --run-dir $(RUN_DIR) $(RUN_DIR) $(VENV) .pytest_cache
