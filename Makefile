# The README's commands. `make test` and `make demo` set everything up themselves.
VENV    ?= .venv
PY      := $(VENV)/bin/python
# The CUDA kernels are compiled whenever nvcc is found, so they cannot rot unnoticed
# on machines without a GPU; D2DETR_WITH_CUDA=0 skips them. TORCH_CUDA_ARCH_LIST,
# when set, is passed on; unset, setup.py builds for the visible GPU (with PTX), or
# without one for 7.5;8.0;9.0+PTX.
export CUDA_HOME ?= /usr/local/cuda
CSRC    := $(wildcard d2detr/layers/csrc/*.cpp d2detr/layers/csrc/*.h d2detr/layers/csrc/*.cu d2detr/layers/csrc/*.cuh)
EXT_STAMP := build/.d2detr-ext-stamp
# `make test` runs the suite without the tests marked slow (about 10 min on 2 idle cores);
# `make test PYTEST_ARGS="-m slow"` runs those (every method's ONNX export, large shapes).
PYTEST_ARGS ?=

.PHONY: install test demo bench clean
install: $(VENV)/.d2detr-installed $(EXT_STAMP)

$(VENV)/.d2detr-installed: scripts/install_deps.sh
	VENV=$(VENV) scripts/install_deps.sh
	# Source-checkout install: the package and its projects import from here.
	$(PY) -c "import sysconfig,os; open(os.path.join(sysconfig.get_paths()['purelib'],'d2detr-checkout.pth'),'w').write(os.getcwd()+'\n')"
	touch $@

$(EXT_STAMP): $(VENV)/.d2detr-installed setup.py $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

test: install
	$(PY) -m pytest -q tests -m "not slow" $(PYTEST_ARGS)

demo: install
	$(PY) tools/neon_trees_demo.py

bench: install
	$(PY) tools/benchmark_ms_deform_attn.py

clean:
	rm -rf build d2detr/*.so
