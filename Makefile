# Every target creates .venv itself, so a fresh clone needs nothing but python3.
# TORCH is overridable: the default pin is a CPU build that installs from local disk here;
# e.g. `make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

# fitstream is only for tests/test_stream.py, which runs it side by side with
# mini_trainer.stream; it declares Python >= 3.12 but runs on 3.11, and --no-deps keeps its
# own torch requirement from pulling another build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[examples,dev,bench,lm,stream]"
	$(PY) -m pip install -q --no-deps --ignore-requires-python fitstream==0.4.1
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mini-trainer train configs/digits_mlp.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
