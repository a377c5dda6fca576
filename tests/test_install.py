"""A normal (non-editable) install works outside the checkout.

Builds a wheel of a copy of the checkout (``pip wheel --no-build-isolation``, C++ op only), unpacks
it into a temporary ``site`` folder and, in a fresh interpreter whose working directory is outside
the checkout and whose ``sys.path`` has the checkout removed (torch, Detectron2 and the data
packages come from this environment), loads one config of every method through
``d2detr.model_zoo``, instantiates it and runs it on an image; a project's R50 config (whose
``from ....configs.common`` imports fail when ``configs/`` is not packaged) is built too, and every
meta-architecture is found in Detectron2's ``META_ARCH_REGISTRY``.
"""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {
    "detr": "DETR", "conditional_detr": "ConditionalDETR", "dab_detr": "DABDETR",
    "deformable_detr": "DeformableDETR", "dab_deformable_detr": "DABDeformableDETR", "dino": "DINO",
    "focus_detr": "FocusDETR", "sd_detr": "SDDETR", "adamixer": "AdaMixer", "rnndet": "RNNDet",
    "deqdet": "DEQDet",
}

SCRIPT = r'''
import os, sys
repo = os.path.realpath(sys.argv[1])
sys.path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo]
import torch
torch.set_num_threads(1)
import d2detr
from d2detr import model_zoo
from detectron2.config import instantiate
from detectron2.modeling import META_ARCH_REGISTRY
site = os.path.realpath(sys.argv[2])
assert os.path.realpath(d2detr.__file__).startswith(site), d2detr.__file__
assert not model_zoo.get_config_file("dino/dino_r50_4scale_12ep.py").startswith(repo)
methods = dict(a.split("=") for a in sys.argv[3:])
torch.manual_seed(0)
image = torch.randint(0, 256, (3, 128, 160), dtype=torch.uint8)
for method, arch in methods.items():
    cfg = model_zoo.get_config(f"neon_trees/{method}_mobilenetv2.py")
    model = instantiate(cfg.model).eval()
    assert type(model).__name__ == arch and META_ARCH_REGISTRY.get(arch) is type(model), (method, type(model))
    assert os.path.realpath(sys.modules[type(model).__module__].__file__).startswith(site)
    with torch.no_grad():
        inst = model([{"image": image, "height": 128, "width": 160}])[0]["instances"]
    boxes = inst.pred_boxes.tensor
    assert len(inst) > 0 and torch.isfinite(boxes).all() and (boxes[:, 2] <= 160).all(), method
    print("ran", method, arch, len(inst))
r50 = instantiate(model_zoo.get_config("deformable_detr/deformable_detr_r50_50ep.py").model)
print("built R50", type(r50).__name__, sum(p.numel() for p in r50.parameters()))
'''


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "output", "*.so", "__pycache__", "*.egg-info", ".pytest_cache"))
    env = dict(os.environ, D2DETR_WITH_CUDA="0", MAX_JOBS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(src)],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = glob.glob(str(root / "dist" / "d2detr-*.whl"))
    site = root / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return wheel, site


def test_wheel_contains_configs_and_op(wheel_site):
    wheel, _ = wheel_site
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "d2detr/configs/common/train.py" in names and "d2detr/configs/neon_trees/dino_mobilenetv2.py" in names
    assert "d2detr/projects/deformable_detr/configs/deformable_detr_r50_50ep.py" in names
    assert "d2detr/model_zoo.py" in names
    assert any(n.startswith("d2detr/_C") and n.endswith(".so") for n in names)


def test_every_method_runs_from_the_installed_wheel_outside_the_checkout(wheel_site, tmp_path):
    _, site = wheel_site
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), REPO, str(site), *(f"{m}={a}" for m, a in METHODS.items())],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ran ") == len(METHODS) and "built R50 DeformableDETR" in proc.stdout


def test_model_zoo_names_and_errors():
    from d2detr import model_zoo

    assert model_zoo.get_config_file("deformable_detr/deformable_detr_r50_50ep.py") == os.path.join(
        REPO, "projects", "deformable_detr", "configs", "deformable_detr_r50_50ep.py")
    assert model_zoo.get_config_file("neon_trees/dino_mobilenetv2.py") == os.path.join(
        REPO, "configs", "neon_trees", "dino_mobilenetv2.py")
    names = model_zoo.list_configs()
    assert "dino/dino_r50_4scale_12ep.py" in names and "neon_trees/deqdet_mobilenetv2.py" in names
    with pytest.raises(RuntimeError, match="not a shipped d2detr config"):
        model_zoo.get_config_file("dino/no_such.py")
    with pytest.raises(ValueError, match="ships no trained weights"):
        model_zoo.get_config("dino/dino_r50_4scale_12ep.py", trained=True)
