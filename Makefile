# reid-deploy: every target sets up .venv first (idempotent).
VENV  := .venv
PY    := $(VENV)/bin/python
REID  := $(VENV)/bin/reid
STAMP := $(VENV)/.installed
DEMO_DATA := demo_data
# the oldest supported stack (constraints-oldest.txt = pyproject's lower bounds) runs the tests that export,
# quantize or load models; ONNX Runtime 1.18 alone (constraints-ort118.txt) loads every exported artefact
OLDEST       := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed
OLDEST_TESTS := tests/test_export.py tests/test_runtime.py tests/test_tensorrt.py tests/test_identity.py \
                tests/test_trt_support.py tests/test_ort_compat.py
ORT118       := .venv-ort118
ORT118_STAMP := $(ORT118)/.installed

.PHONY: install demo test bench bench-quick lint clean brokers

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --disable-pip-version-check -c constraints.txt -e '.[cpu,dev]'
	touch $(STAMP)

$(OLDEST_STAMP): pyproject.toml constraints-oldest.txt
	test -x $(OLDEST)/bin/python || python3 -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --no-cache-dir --disable-pip-version-check -c constraints-oldest.txt -e '.[cpu,dev]'
	touch $(OLDEST_STAMP)

$(ORT118_STAMP): constraints-ort118.txt
	test -x $(ORT118)/bin/python || python3 -m venv $(ORT118)
	$(ORT118)/bin/python -m pip install --quiet --no-cache-dir --disable-pip-version-check -r constraints-ort118.txt
	touch $(ORT118_STAMP)

DEMO      := results/demo
DEMO_KEY  := $(DEMO)/demo.key
DEMO_CKPT := $(DEMO)/train/reid_model_latest.pth
DEMO_ONNX := $(DEMO)/export/model.onnx.enc

demo: install
	@echo "== 1. demo data and spec"
	rm -rf $(DEMO_DATA) $(DEMO)
	$(REID) demo-data $(DEMO_DATA) --seed 0
	$(REID) spec validate specs/demo.yaml
	$(REID) dataset-summary -e specs/demo.yaml
	@echo "== 2. train (CPU, a few minutes; mAP before and after in the log)"
	$(REID) train -e specs/demo.yaml
	@echo "== 3. evaluate, with and without re-ranking"
	$(REID) evaluate -e specs/demo.yaml evaluate.checkpoint=$(DEMO_CKPT)
	$(REID) evaluate -e specs/demo.yaml evaluate.checkpoint=$(DEMO_CKPT) re_ranking.re_ranking=false \
		evaluate.results_dir=$(DEMO)/evaluate_plain
	@echo "plots: $(DEMO)/evaluate/cmc_curve.png $(DEMO)/evaluate/sampled_matches.png"
	@echo "== 4. export to encrypted ONNX (+ static INT8; a ResNet has no layers for dynamic INT8), inference through ONNX Runtime from the encrypted files"
	@mkdir -p $(DEMO) && umask 077 && echo "reid-deploy-demo-passphrase" > $(DEMO_KEY)
	$(REID) export -e specs/demo.yaml export.checkpoint=$(DEMO_CKPT) export.int8=both export.eval_map=true \
		--key-file $(DEMO_KEY)
	$(REID) inference -e specs/demo.yaml inference.checkpoint=$(DEMO_ONNX) --key-file $(DEMO_KEY)
	$(REID) evaluate -e specs/demo.yaml evaluate.checkpoint=$(DEMO)/export/model.qdq.onnx.enc \
		evaluate.results_dir=$(DEMO)/evaluate_int8 --key-file $(DEMO_KEY)
	@echo "== 5. build-engine: TensorRT (needs an NVIDIA GPU + TensorRT), then the ONNX Runtime CPU artefact"
	-$(REID) build-engine -e specs/demo.yaml build_engine.onnx_file=$(DEMO_ONNX) --key-file $(DEMO_KEY)
	$(REID) build-engine -e specs/demo.yaml build_engine.onnx_file=$(DEMO_ONNX) build_engine.target=onnxruntime \
		build_engine.precision=fp32 --key-file $(DEMO_KEY)
	@echo "== 6. gallery index from the encrypted model, then search with re-ranking"
	$(REID) index build --model $(DEMO_ONNX) --images $(DEMO_DATA)/bounding_box_test --out $(DEMO)/gallery.index \
		-e specs/demo.yaml --key-file $(DEMO_KEY)
	$(REID) search --index $(DEMO)/gallery.index --model $(DEMO_ONNX) --query $(DEMO_DATA)/query --top-k 10 \
		--rerank --out $(DEMO)/search.json --montage $(DEMO)/search.png -e specs/demo.yaml --key-file $(DEMO_KEY)
	@echo "== demo done: outputs in $(DEMO)/"

# the MQTT broker of tests/test_ingest.py: Debian's mosquitto (MQTT 5), installed when missing (as root)
MOSQUITTO := $(shell command -v mosquitto 2>/dev/null || ls /usr/sbin/mosquitto 2>/dev/null)

brokers:
ifeq ($(MOSQUITTO),)
	@test "$$(id -u)" = 0 || { echo "tests/test_ingest.py needs mosquitto: apt-get install mosquitto (as root)"; exit 2; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto
endif

test: install $(OLDEST_STAMP) $(ORT118_STAMP) brokers
	REID_ORT118_PYTHON=$(CURDIR)/$(ORT118)/bin/python $(PY) -m pytest
	REID_ORT118_PYTHON=$(CURDIR)/$(ORT118)/bin/python $(OLDEST)/bin/python -m pytest $(OLDEST_TESTS)

bench: install
	$(PY) -m bench.run

bench-quick: install
	$(PY) -m bench.run --quick

lint: install
	$(PY) -m ruff check reid_deploy tests bench

clean:
	rm -rf results $(DEMO_DATA) .pytest_cache
