#!/usr/bin/env python
"""Builds and installs d2detr.

The native operators (``d2detr._C``: multi-scale deformable attention) are
always built for the CPU; the CUDA kernels are added whenever nvcc is found
(``$CUDA_HOME/bin/nvcc``, ``/usr/local/cuda/bin/nvcc`` or ``nvcc`` on PATH) —
even on machines without a GPU, so they cannot rot unnoticed.

Environment:
    D2DETR_WITH_CUDA=1 / 0   force the CUDA kernels on / off
    TORCH_CUDA_ARCH_LIST     GPU architectures (default: the visible GPUs' with PTX,
                             else "7.5;8.0;9.0+PTX"; see default_cuda_arch_list)
    CUDA_HOME                CUDA toolkit (default: /usr/local/cuda when present)
    MAX_JOBS                 parallel compile jobs (ninja)

    python setup.py build_ext --inplace      # develop in a source checkout
    pip install --no-build-isolation .       # install (needs torch installed)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("d2detr", "layers", "csrc")


def _fail(msg):
    sys.stderr.write(f"\n[d2detr setup] error: {msg}\n\n")
    sys.exit(1)


# torch.utils.cpp_extension reads CUDA_HOME once, when imported, and otherwise
# guesses /usr/local: point it at the usual toolkit location first.
if not os.environ.get("CUDA_HOME") and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:
    _fail(
        f"PyTorch is required to build d2detr's native operators but could not be imported ({e}).\n"
        "Install torch first (e.g. `pip install torch torchvision`), then build with "
        "`python setup.py build_ext --inplace`, or `pip install --no-build-isolation .`."
    )


def _version():
    ns = {}
    with open(os.path.join(ROOT, "d2detr", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                exec(line, ns)
    return ns.get("__version__", "0.0.0")


def _find_nvcc():
    cands = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append((home, os.path.join(home, "bin", "nvcc")))
    which = shutil.which("nvcc")
    if which:
        cands.append((os.path.dirname(os.path.dirname(os.path.realpath(which))), which))
    for home, nvcc in cands:
        if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            return home, nvcc
    return None, None


def _with_cuda():
    flag = os.environ.get("D2DETR_WITH_CUDA", "").strip().lower()
    home, nvcc = _find_nvcc()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if nvcc is None:
            _fail(
                "D2DETR_WITH_CUDA=1 but nvcc was not found: set CUDA_HOME to a CUDA toolkit "
                "(e.g. CUDA_HOME=/usr/local/cuda) or unset D2DETR_WITH_CUDA."
            )
    elif nvcc is None:
        return False
    if torch.version.cuda is None:
        if flag in ("1", "true", "yes", "on"):
            _fail(f"D2DETR_WITH_CUDA=1 but this torch ({torch.__version__}) is a CPU-only build.")
        print(f"[d2detr setup] nvcc found but torch {torch.__version__} has no CUDA: building CPU kernels only")
        return False
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported; make sure it
    # sees the toolkit we found (it would otherwise guess /usr/local).
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    return True


def default_cuda_arch_list(gpu_capabilities, nvcc_archs=None):
    """TORCH_CUDA_ARCH_LIST when none is given (pure: tests call it with made-up machines).

    gpu_capabilities: (major, minor) of each visible GPU; nvcc_archs: the (major, minor)
    nvcc compiles for (`nvcc --list-gpu-arch`), None when unknown. A cubin runs only on
    its own major version (sm_80's on 8.x), PTX is JIT-compiled by the driver for any
    newer GPU, so:
      * with GPUs: their architectures (each clamped to the newest nvcc knows), PTX of
        the newest;
      * without: Volta 7.0 (only where nvcc still has it: CUDA 13 dropped it), Turing
        7.5 (T4), Ampere 8.0 (also A10/L4/RTX 30-40), Hopper 9.0, and PTX of 9.0 so
        that Blackwell and later run too.
    """
    def known(arch):
        return nvcc_archs is None or arch in nvcc_archs

    def clamp(cap):
        if nvcc_archs is None or cap in nvcc_archs:
            return cap
        older = [a for a in nvcc_archs if a <= cap]
        return max(older) if older else min(nvcc_archs)

    if gpu_capabilities:
        archs = sorted({clamp(tuple(c)) for c in gpu_capabilities})
    else:
        archs = [a for a in [(7, 0), (7, 5), (8, 0), (9, 0)] if known(a)]
        if not archs:
            archs = [max(nvcc_archs)]
    names = [f"{major}.{minor}" for major, minor in archs]
    names[-1] += "+PTX"
    return ";".join(names)


def _visible_gpu_capabilities():
    try:
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no driver, or a broken one: build for the portable list
        return []


def _nvcc_archs(nvcc):
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = {(int(n) // 10, int(n) % 10) for n in re.findall(r"compute_(\d+)", out)}
    return sorted(archs) or None


def get_extensions():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    if not sources:
        _fail(f"no C++ sources found under {CSRC}")
    stems = {os.path.splitext(os.path.basename(s))[0] for s in sources}
    clash = [s for s in cuda_sources if os.path.splitext(os.path.basename(s))[0] in stems]
    if clash:
        _fail(f"{clash} share a file stem with a .cpp file (ninja: 'multiple rules generate'); rename them")

    define_macros = []
    extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-Wno-psabi"]}
    extra_link_args = ["-fopenmp"]
    if sys.platform == "darwin" or os.name == "nt":  # no GNU OpenMP flags there
        extra_compile_args["cxx"] = ["-O3"] if os.name != "nt" else ["/O2"]
        extra_link_args = []
    ext_cls = cpp_extension.CppExtension
    if _with_cuda() and cuda_sources:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(
                _visible_gpu_capabilities(), _nvcc_archs(_find_nvcc()[1])
            )
        ext_cls = cpp_extension.CUDAExtension
        sources = sources + cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        print(
            f"[d2detr setup] building CPU + CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
    else:
        print("[d2detr setup] building CPU kernels only (no nvcc, or D2DETR_WITH_CUDA=0)")
    return [
        ext_cls(
            "d2detr._C",
            sources,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, with a readable hint when the compiler fails."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception as e:  # compiler/ninja errors arrive as various exception types
            sys.stderr.write(
                "\n[d2detr setup] error: building the native operators (d2detr._C) failed: "
                f"{type(e).__name__}: {e}\n"
                "  Needs the C++ compiler torch's headers require (C++20: g++ >= 10 or clang >= 11), the headers of the installed torch, and for the "
                "CUDA kernels an nvcc matching torch.version.cuda "
                f"({torch.version.cuda}).\n"
                "  Build CPU kernels only with D2DETR_WITH_CUDA=0; the compiler output above names what is "
                "missing.\n\n"
            )
            raise


def get_packages():
    from setuptools import find_namespace_packages

    pkgs = find_packages(include=("d2detr", "d2detr.*"))
    package_dir, package_data = {}, {}
    # Like Detectron2: projects/<name> installs as d2detr.projects.<name>, so
    # method code stays importable after a non-editable install.
    for proj in sorted(glob.glob(os.path.join(ROOT, "projects", "*"))):
        name = os.path.basename(proj)
        if not os.path.isdir(proj) or not name.isidentifier():
            continue
        root = f"d2detr.projects.{name}"
        rel = os.path.relpath(proj, ROOT)
        package_dir[root] = rel
        package_data[root] = ["*.md", "**/*.yaml", "**/*.json"]
        pkgs.append(root)
        for sub in find_namespace_packages(where=proj, exclude=("*__pycache__*",)):
            pkgs.append(f"{root}.{sub}")
            package_dir[f"{root}.{sub}"] = os.path.join(rel, *sub.split("."))
    # configs/ installs as d2detr.configs (data: LazyConfig files, loaded by path), so that a
    # project config's `from ....configs.common ...` finds d2detr/configs/common in a wheel as it
    # finds configs/common in the checkout; d2detr.model_zoo looks in both places.
    pkgs.append("d2detr.configs")
    package_dir["d2detr.configs"] = "configs"
    for sub in find_namespace_packages(where=os.path.join(ROOT, "configs"), exclude=("*__pycache__*",)):
        pkgs.append(f"d2detr.configs.{sub}")
        package_dir[f"d2detr.configs.{sub}"] = os.path.join("configs", *sub.split("."))
    return pkgs, package_dir, package_data


packages, package_dir, package_data = get_packages()

setup(
    name="d2detr",
    version=_version(),
    description="The DETR family of end-to-end object detectors as Detectron2 models",
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    python_requires=">=3.9",
    install_requires=[
        # torch / torchvision / detectron2 are needed but not pinned: install the
        # builds matching your CUDA first (see scripts/install_deps.sh).
        "fvcore",
        "iopath>=0.1.7",
        "omegaconf>=2.1",
        "hydra-core",
        "pycocotools",
        "scipy",
        "numpy",
        "Pillow",
        "matplotlib",
        "tabulate",
    ],
    extras_require={"test": ["pytest"]},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
