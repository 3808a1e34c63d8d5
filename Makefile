# Two commands for a new user:  `make demo` (install + main job)  and  `make test` (install + tests).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_OUT ?= runs/demo

.PHONY: setup demo train test test-aarch64 bench-accuracy clean

NGINX  := /usr/sbin/nginx
NFQUEUE := /usr/include/libnetfilter_queue/libnetfilter_queue.h
IPTABLES := /usr/sbin/iptables
PROMETHEUS := /usr/bin/prometheus
CHROMEDRIVER := /usr/bin/chromedriver

setup: $(VENV)/.installed $(FMNIST) $(NGINX) $(IPTABLES) $(PROMETHEUS) $(CHROMEDRIVER)

# A Debian package, installed with sudo where we are not root; `apt-get update` only when the lists lack it.
define apt_install
	@if command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(1) || { $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(1); }; \
	else echo "$(2)" >&2; exit 1; fi
endef

# torch first, CPU build: a local wheel where the machine has one, else PyTorch's CPU index.
$(VENV)/.installed: pyproject.toml | $(NFQUEUE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) || $(PIP) install -q $(TORCH) --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -e '.[simulation,dev]'  # everything: a device alone needs only the base install
	touch $@

# The dev extra's NetfilterQueue (the bad-network tests' link emulator, benchmarks/netem_queue.py) builds against it.
$(NFQUEUE):
	$(call apt_install,libnetfilter-queue-dev,no $(NFQUEUE): install Debian's libnetfilter-queue-dev (NetfilterQueue builds against it))

# iptables sends a test host's packets to that emulator where the kernel has no netem.
$(IPTABLES):
	$(call apt_install,iptables,no $(IPTABLES): install Debian's iptables (the bad-network tests use it))

# Fashion-MNIST ships as a Debian package; elsewhere pass --data-dir to the CLI.
$(FMNIST):
	$(call apt_install,dataset-fashion-mnist,Fashion-MNIST not found at $(FMNIST); install Debian's dataset-fashion-mnist or use --data-dir)

# A TLS coordinator exposes only Flower's Fleet API, through nginx (coordinator/fleet_proxy.py); its
# service is not started: the coordinator runs its own nginx.
$(NGINX):
	$(call apt_install,nginx,no nginx at $(NGINX): install it (a TLS coordinator's SuperLink is reached through it))

# The metrics tests scrape the coordinator and an agent with a real Prometheus (its service is not started).
$(PROMETHEUS):
	$(call apt_install,prometheus,no $(PROMETHEUS): install Debian's prometheus (the metrics tests scrape with it))

# The dashboard's browser test drives Debian's headless Chromium through its chromedriver.
$(CHROMEDRIVER):
	$(call apt_install,chromium chromium-driver,no $(CHROMEDRIVER): install Debian's chromium and chromium-driver (the dashboard's browser test))

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

# The wheel built on aarch64, installed where there is no compiler, its kernel tests and served model checked
# there, all under qemu emulation (root; tests/aarch64/run.sh says how).
test-aarch64: setup
	$(call apt_install,qemu-user-static binfmt-support debootstrap,test-aarch64 needs Debian's qemu-user-static binfmt-support debootstrap)
	PY=$(PY) tests/aarch64/run.sh

bench-accuracy: setup
	$(PY) -m benchmarks.accuracy

clean:
	rm -rf $(VENV) runs build *.egg-info
