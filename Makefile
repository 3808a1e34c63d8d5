# Two commands for a new user:  `make demo` (install + main job)  and  `make test` (install + tests).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_OUT ?= runs/demo

.PHONY: setup demo train test bench-accuracy clean

setup: $(VENV)/.installed $(FMNIST)

# torch first, CPU build: a local wheel where the machine has one, else PyTorch's CPU index.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) || $(PIP) install -q $(TORCH) --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -e '.[simulation,dev]'  # everything: a device alone needs only the base install
	touch $@

# Fashion-MNIST ships as a Debian package; elsewhere pass --data-dir to the CLI.
$(FMNIST):
	@if command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }; \
	else echo "Fashion-MNIST not found at $(FMNIST); install Debian's dataset-fashion-mnist or use --data-dir" >&2; exit 1; fi

# The main job: a 100-device heterogeneous fleet trains DRESS federatedly on Flower's simulation engine.
demo: setup
	$(VENV)/bin/dress-fleet simulate --devices 100 --rounds 40 --fraction 0.1 \
	    --out $(DEMO_OUT)

# Centralized DRESS training + per-density evaluation (a few minutes on 2 cores).
train: setup
	$(VENV)/bin/dress-fleet train --dataset fashion-mnist --model cnn --densities 1,0.5,0.25,0.1 \
	    --epochs 2 --out runs/train
	$(VENV)/bin/dress-fleet evaluate runs/train/model.safetensors

test: setup
	$(PY) -m pytest -q

bench-accuracy: setup
	$(PY) benchmarks/accuracy.py

clean:
	rm -rf $(VENV) runs build *.egg-info
