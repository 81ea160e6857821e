# reid-deploy: every target sets up .venv first (idempotent).
VENV  := .venv
PY    := $(VENV)/bin/python
REID  := $(VENV)/bin/reid
STAMP := $(VENV)/.installed
DEMO_DATA := demo_data

.PHONY: install demo test bench bench-quick lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(REID) demo-data $(DEMO_DATA) --seed 0
	$(REID) spec validate specs/demo.yaml
	$(REID) dataset-summary -e specs/demo.yaml

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m bench.run

bench-quick: install
	$(PY) -m bench.run --quick

lint: install
	$(PY) -m ruff check reid_deploy tests bench

clean:
	rm -rf results $(DEMO_DATA) .pytest_cache
