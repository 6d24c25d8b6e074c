# Every target creates .venv itself, so a fresh clone needs nothing but python3.
# TORCH is overridable: the default pin is a CPU build that installs from local disk here;
# e.g. `make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
# Two stamps: the demo needs only the package and its examples extra; tests, lint and
# benchmarks need every extra. The full install includes the demo's, so it stamps both.
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[examples]"
	touch $(DEMO_STAMP)

# fitstream is only for tests/test_stream.py, which runs it side by side with
# mini_trainer.stream; it declares Python >= 3.12 but runs on 3.11, and --no-deps keeps its
# own torch requirement from pulling another build.
$(STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[examples,dev,bench,lm,stream,tensorboard]"
	$(PY) -m pip install -q --no-deps --ignore-requires-python fitstream==0.4.1
	touch $(DEMO_STAMP) $(STAMP)

venv: $(STAMP)

# Trains (or continues) the main job, then draws its learning curves and prints where.
demo: $(DEMO_STAMP)
	$(VENV)/bin/mini-trainer train configs/digits_mlp.py
	$(VENV)/bin/mini-trainer plot runs/digits_mlp -o runs/digits_mlp/curves.png

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
