#!/usr/bin/env python
"""Inference latency, training-step time and peak memory of a model config on this device.

    python tools/benchmark.py                                   # Deformable DETR R50, 800x1333
    python tools/benchmark.py --config-file projects/deformable_detr/configs/deformable_detr_mobilenetv2_neon_trees.py \
        --height 416 --width 416
    python tools/benchmark.py --compare-hf --threads 2          # CPU: vs transformers, same weights
    python tools/benchmark.py --config-file projects/focus_detr/configs/models/focus_detr_r50.py \
        --compare-config projects/dino/configs/models/dino_r50_4scale.py --no-train --threads 2  # two configs
    python tools/benchmark.py --onnx --no-train --threads 2     # CPU: eager vs the ONNX file in onnxruntime

Times are measured in this process: one warm-up run of each model, then ``--runs``
timed runs (``--train-runs`` for training steps), alternating between the models run by
run so that load changes hit them alike; the median is reported. Peak memory is measured
in one fresh child process per model and measurement (one inference; two training steps,
the second with the optimizer state the first created): the peak resident set size during
the runs minus the RSS just before them (``ru_maxrss`` when the runs raised the
high-water mark, else a 5 ms RSS sampler) -- the activations, gradients and optimizer
state on top of the model. On CUDA it is ``torch.cuda.max_memory_allocated``.
A training step is forward + loss + backward + AdamW step on one image with 10 boxes.

``--compare-config CFG``: measures that config's model too, side by side with ``--config-file``'s
(same image, same overrides, timed alternately in this process, memory in fresh processes), and
prints the ratios (theirs / ours) -- Focus-DETR against DINO for the efficiency claim.

``--onnx``: also exports the same model (same weights) with ``d2detr.export.export_onnx``
(deformable attention as standard ONNX operators), checks that onnxruntime gives the eager
detections on the benchmark image, and times the file in onnxruntime's CPU provider (inference
only, ``intra_op_num_threads`` = ``--threads``) alternating with eager PyTorch in this process.

``--compare-hf`` (Deformable DETR only): builds Hugging Face's
``DeformableDetrForObjectDetection`` (timm ResNet-50, random weights, pure-PyTorch
attention: ``disable_custom_kernels=True``), converts its weights with
``d2detr.checkpoint``'s converter into our model, checks that both predict the same
boxes, then measures both with exactly those weights and prints the ratios (theirs / ours).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

DEFAULT_CONFIG = os.path.join(_REPO, "projects", "deformable_detr", "configs", "models", "deformable_detr_r50.py")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_BOXES = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help="LazyConfig with a `model` (default: Deformable DETR R50)")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--train-runs", type=int, default=None, help="timed training steps (default: --runs)")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--compare-hf", action="store_true", help="also measure transformers' DeformableDetrForObjectDetection")
    p.add_argument("--compare-config", default=None, metavar="CFG",
                   help="also measure this config's model, side by side (same image and overrides)")
    p.add_argument("--onnx", action="store_true", help="also time the model's ONNX file in onnxruntime (CPU, inference)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    # internal: one measurement in a child process
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--onnx-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ inputs


def make_inputs(height, width, num_classes, device):
    """One image (uint8 range, float) and NUM_BOXES ground-truth boxes, seeded."""
    import torch

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), generator=g).float()
    cxcy = torch.rand(NUM_BOXES, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(NUM_BOXES, 2, generator=g) * 0.3 + 0.05
    boxes_cxcywh = torch.cat([cxcy, wh], 1)
    labels = torch.randint(0, num_classes, (NUM_BOXES,), generator=g)
    return image.to(device), boxes_cxcywh, labels


def ours_batch(image, boxes_cxcywh, labels, train):
    from detectron2.structures import Boxes, Instances

    h, w = image.shape[-2:]
    item = {"image": image, "height": h, "width": w}
    if train:
        b = boxes_cxcywh.clone()
        xyxy = torch_cat_xyxy(b) * b.new_tensor([w, h, w, h])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(xyxy.to(image.device))
        inst.gt_classes = labels.to(image.device)
        item["instances"] = inst
    return [item]


def torch_cat_xyxy(b):
    import torch

    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)


# ----------------------------------------------------------------------------- models


def build_ours(config_file, opts, overrides=None, state_dict=None):
    import torch
    from detectron2.config import LazyConfig, instantiate

    from d2detr.checkpoint import apply_overrides

    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(opts))
    if overrides:
        apply_overrides(cfg, overrides)
    torch.manual_seed(0)  # the same random weights in every process (the ONNX file is exported from them)
    model = instantiate(cfg.model)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def hf_config_kwargs():
    return dict(
        use_timm_backbone=True,
        backbone="resnet50",
        use_pretrained_backbone=False,
        disable_custom_kernels=True,
        num_labels=80,
        auxiliary_loss=True,  # as ours: losses on every decoder layer
    )


def build_hf(config_dict=None, state_dict=None, seed=0):
    import torch
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(**(config_dict or hf_config_kwargs()))
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(config)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def prepare_hf_weights(folder, config_file, opts):
    """Builds the HF model, converts it, checks parity on a small image; saves both."""
    import torch

    from d2detr.checkpoint import convert_hf_checkpoint

    hf = build_hf().eval()
    sd, overrides = convert_hf_checkpoint(hf.state_dict(), hf.config, classes="keep")
    ours = build_ours(config_file, opts, overrides, sd).eval()
    image, _, _ = make_inputs(320, 480, 80, "cpu")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        theirs = hf(pixel_values=((image / 255 - mean) / std)[None])
        images, masks = ours.preprocess_image([{"image": image}])
        mine = ours.forward_features(images, masks)
    diff = max(
        (mine["pred_logits"] - theirs.logits).abs().max().item(),
        (mine["pred_boxes"] - theirs.pred_boxes).abs().max().item(),
    )
    path = os.path.join(folder, "weights.pt")
    torch.save(
        {"hf": hf.state_dict(), "hf_config": hf_config_kwargs(), "ours": sd, "overrides": overrides}, path
    )
    return path, diff


# ---------------------------------------------------------------------------- measuring


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or process RSS above the start."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = _rss_bytes()
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.sampled = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.sampled = max(self.sampled, _rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return False
        self._stop.set()
        self._thread.join()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        top = maxrss if maxrss > self.maxrss0 else max(self.sampled, _rss_bytes())
        self.peak = top - self.base
        return False


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_model(impl, args, weights):
    """The model of ``impl`` on ``args.device``: ours, transformers', or an onnxruntime session of
    ``args.onnx_file``."""
    if impl == "onnx":
        return onnx_session(args.onnx_file, args.threads)
    if impl == "hf":
        return build_hf(weights["hf_config"], weights["hf"]).to(args.device)
    overrides, state_dict = (weights["overrides"], weights["ours"]) if weights else (None, None)
    return build_ours(args.config_file, args.opts, overrides, state_dict).to(args.device)


def onnx_session(path, threads=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def prepare_onnx(folder, args, weights):
    """Exports our model (the weights every process builds) to ``folder/model.onnx``; returns
    the path and {"boxes_px", "scores"}: max |onnxruntime - eager| on the benchmark image."""
    import torch

    from d2detr.export import ExportableDetector, export_onnx

    model = load_model("ours", args, weights).eval()
    image = make_inputs(args.height, args.width, 1, "cpu")[0].to(torch.uint8)
    path = os.path.join(folder, "model.onnx")
    export_onnx(model, image, path)
    boxes, scores, _ = onnx_session(path, args.threads).run(None, {"image": image.numpy()})
    with torch.no_grad():
        ref_boxes, ref_scores, _ = ExportableDetector(model)(image)
    diff = {"boxes_px": float(abs(boxes - ref_boxes.numpy()).max()), "scores": float(abs(scores - ref_scores.numpy()).max())}
    return path, diff


def make_step(impl, model, mode, args, weights):
    """A callable running one inference (no grad) or one training step (forward, loss,
    backward, AdamW step) of ``model`` on the seeded image; sets eval/train mode."""
    import torch

    device = args.device
    num_classes = weights["hf_config"]["num_labels"] if weights else int(getattr(model, "num_classes", 80))
    image, boxes, labels = make_inputs(args.height, args.width, num_classes, device)
    train = mode == "train"
    if impl == "onnx":
        if train:
            raise ValueError("the ONNX file is measured for inference only")
        feed = {"image": image.to(torch.uint8).cpu().numpy()}  # the file takes uint8, as exported

        def step():
            model.run(None, feed)

        return step
    if impl == "hf":
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
        pixel_values = ((image / 255 - mean) / std)[None]
        pixel_mask = torch.ones(1, args.height, args.width, dtype=torch.long, device=device)
        hf_labels = [{"class_labels": labels.to(device), "boxes": boxes.to(device)}]

        def forward():
            if train:
                return model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=hf_labels).loss
            return model(pixel_values=pixel_values, pixel_mask=pixel_mask)

    else:
        batch = ours_batch(image, boxes, labels, train)

        def forward():
            out = model(batch)
            return sum(out.values()) if train else out

    if train:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            model.train()
            loss = forward()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)

    else:

        def step():
            model.eval()
            with torch.no_grad():
                forward()
            _sync(device)

    return step


def run_worker(args):
    """Peak memory of one measurement in a fresh process; prints a JSON line.
    ``args.worker`` = "<ours|hf|onnx>:<infer|train>". A training measurement makes two steps:
    the second runs with the optimizer state that the first one created."""
    import torch

    impl, mode = args.worker.split(":")
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = torch.load(args.weights, map_location="cpu", weights_only=False) if args.weights else None
    model = load_model(impl, args, weights)
    step = make_step(impl, model, mode, args, weights)
    with _PeakMemory(args.device) as mem:
        for _ in range(2 if mode == "train" else 1):
            step()
    print("RESULT " + json.dumps({"impl": impl, "mode": mode, "peak_bytes": mem.peak}), flush=True)


def measure_memory(args, impl, mode, weights_path=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{impl}:{mode}", "--device", args.device]
    cmd += ["--config-file", args.config_file, "--height", str(args.height), "--width", str(args.width)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if weights_path:
        cmd += ["--weights", weights_path]
    if impl == "onnx":
        cmd += ["--onnx-file", args.onnx_file]
    cmd += list(args.opts)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])["peak_bytes"]
    raise RuntimeError(f"benchmark worker {impl}:{mode} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def measure_times(args, impls, modes, weights):
    """Median seconds per (impl, mode), measured in this process: after one warm-up run of
    each, the implementations alternate run by run, so load changes hit both alike."""
    import torch

    models = {impl: load_model(impl, args, weights) for impl in impls}
    times = {}
    for mode in modes:
        runs = (args.train_runs or args.runs) if mode == "train" else args.runs
        mode_impls = _impls_for(mode, impls)
        steps = {impl: make_step(impl, models[impl], mode, args, weights) for impl in mode_impls}
        for impl in mode_impls:
            steps[impl]()  # warm-up
        for impl in mode_impls:
            times[(impl, mode)] = []
        for _ in range(runs):
            for impl in mode_impls:
                t = time.perf_counter()
                steps[impl]()
                times[(impl, mode)].append(time.perf_counter() - t)
        for impl in mode_impls:
            ts = times[(impl, mode)]
            print(f"  {impl:>4} {mode:<5}: {', '.join(_fmt_time(t) for t in ts)}", flush=True)
    del models
    return {k: statistics.median(v) for k, v in times.items()}, times


def _impls_for(mode, impls):
    return [impl for impl in impls if not (impl == "onnx" and mode == "train")]


def _fmt_time(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_mem(b):
    return f"{b / 2**20:.0f} MiB"


def compare_configs(args, modes):
    """``--compare-config``: both configs' models timed alternately in this process (one warm-up
    each, the median of ``--runs``), their peak memory in fresh processes; prints a table."""
    import copy

    import torch

    configs = {"ours": args.config_file, "compared": args.compare_config}
    names = {k: os.path.relpath(v, _REPO) for k, v in configs.items()}
    times = {}
    for mode in modes:
        runs = (args.train_runs or args.runs) if mode == "train" else args.runs
        steps = {}
        for key, config in configs.items():
            torch.manual_seed(0)
            steps[key] = make_step("ours", build_ours(config, args.opts).to(args.device), mode, args, None)
            steps[key]()  # warm-up
        for key in configs:
            times[(key, mode)] = []
        for _ in range(runs):
            for key in configs:
                t = time.perf_counter()
                steps[key]()
                times[(key, mode)].append(time.perf_counter() - t)
        for key in configs:
            print(f"  {names[key]} {mode}: {', '.join(_fmt_time(t) for t in times[(key, mode)])}", flush=True)
        del steps
    print("peak memory (one fresh process each):", flush=True)
    peaks = {}
    for mode in modes:
        for key, config in configs.items():
            one = copy.copy(args)
            one.config_file = config
            peaks[(key, mode)] = measure_memory(one, "ours", mode)
            print(f"  {names[key]} {mode}: {_fmt_mem(peaks[(key, mode)])}", flush=True)
    threads = args.threads or torch.get_num_threads()
    print()
    print(f"device {args.device} ({threads} threads), image {args.height}x{args.width}, batch 1")
    print(f"| measurement | {names['ours']} | {names['compared']} | compared / first |")
    print("|---|---:|---:|---:|")
    labels = {"infer": "inference latency", "train": "training step"}
    rows = []
    for mode in modes:
        t_a, t_b = (statistics.median(times[(k, mode)]) for k in configs)
        m_a, m_b = peaks[("ours", mode)], peaks[("compared", mode)]
        print(f"| {labels[mode]} (median) | {_fmt_time(t_a)} | {_fmt_time(t_b)} | {t_b / t_a:.2f}x |")
        print(f"| {labels[mode]}: peak memory | {_fmt_mem(m_a)} | {_fmt_mem(m_b)} | {m_b / max(m_a, 1):.2f}x |")
        rows.append({"mode": mode, "config": names["ours"], "compared_config": names["compared"],
                     "times": times[("ours", mode)], "compared_times": times[("compared", mode)],
                     "s": t_a, "compared_s": t_b, "peak_bytes": m_a, "compared_peak_bytes": m_b})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": threads, "height": args.height, "width": args.width,
                       "rows": rows}, f, indent=1)
    return rows


def main(argv=None):
    args = parse_args(argv)
    args.opts = [o for o in args.opts if o != "--"]
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        return run_worker(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    modes = ["infer"] + ([] if args.no_train else ["train"])
    if args.compare_config:
        if args.compare_hf or args.onnx:
            raise SystemExit("--compare-config is a comparison of its own: leave out --compare-hf / --onnx")
        return compare_configs(args, modes)
    impls = ["ours"] + (["hf"] if args.compare_hf else [])
    weights, weights_path, parity = None, None, None
    tmp = tempfile.TemporaryDirectory(prefix="d2detr_bench_")
    if args.compare_hf:
        weights_path, parity = prepare_hf_weights(tmp.name, args.config_file, args.opts)
        weights = torch.load(weights_path, map_location="cpu", weights_only=False)
        print(f"same weights: max |ours - transformers| over logits and boxes = {parity:.1e}", flush=True)
    onnx_parity = None
    if args.onnx:
        if args.device != "cpu":
            raise SystemExit("--onnx measures onnxruntime's CPU provider: add --device cpu")
        print("exporting to ONNX ...", flush=True)
        args.onnx_file, onnx_parity = prepare_onnx(tmp.name, args, weights)
        impls.append("onnx")
        print(f"same weights: max |onnxruntime - eager| = {onnx_parity['boxes_px']:.1e} px on boxes, "
              f"{onnx_parity['scores']:.1e} on scores", flush=True)
    print("timing (this process, alternating):", flush=True)
    medians, all_times = measure_times(args, impls, modes, weights)
    del weights
    print("peak memory (one fresh process each):", flush=True)
    peaks = {}
    for mode in modes:
        for impl in _impls_for(mode, impls):
            peaks[(impl, mode)] = measure_memory(args, impl, mode, weights_path)
            print(f"  {impl:>4} {mode:<5}: {_fmt_mem(peaks[(impl, mode)])}", flush=True)
    tmp.cleanup()

    threads = args.threads or torch.get_num_threads()
    print()
    print(f"device {args.device} ({threads} threads), image {args.height}x{args.width}, batch 1, "
          f"config {os.path.relpath(args.config_file, _REPO)}")
    names = {"infer": "inference latency", "train": "training step"}
    if args.compare_hf:
        print("| measurement | d2detr | transformers | transformers / d2detr |")
        print("|---|---:|---:|---:|")
    else:
        print("| measurement | d2detr |")
        print("|---|---:|")
    rows = []
    for mode in modes:
        t_ours, m_ours = medians[("ours", mode)], peaks[("ours", mode)]
        row = {"mode": mode, "ours_s": t_ours, "ours_times": all_times[("ours", mode)], "ours_peak_bytes": m_ours}
        if args.compare_hf:
            t_hf, m_hf = medians[("hf", mode)], peaks[("hf", mode)]
            row.update(hf_s=t_hf, hf_times=all_times[("hf", mode)], hf_peak_bytes=m_hf)
            print(f"| {names[mode]} (median) | {_fmt_time(t_ours)} | {_fmt_time(t_hf)} | {t_hf / t_ours:.2f}x |")
            print(f"| {names[mode]}: peak memory | {_fmt_mem(m_ours)} | {_fmt_mem(m_hf)} | {m_hf / max(m_ours, 1):.2f}x |")
        else:
            print(f"| {names[mode]} (median) | {_fmt_time(t_ours)} |")
            print(f"| {names[mode]}: peak memory | {_fmt_mem(m_ours)} |")
        if mode == "infer" and args.onnx:  # the same model's ONNX file, in onnxruntime
            t_onnx, m_onnx = medians[("onnx", mode)], peaks[("onnx", mode)]
            row.update(onnx_s=t_onnx, onnx_times=all_times[("onnx", mode)], onnx_peak_bytes=m_onnx)
            na = " — | — |" if args.compare_hf else ""
            print(f"| {names[mode]}: ONNX in onnxruntime (median) | {_fmt_time(t_onnx)} "
                  f"(eager / onnxruntime {t_ours / t_onnx:.2f}x) |{na}")
            print(f"| {names[mode]}: ONNX in onnxruntime, peak memory | {_fmt_mem(m_onnx)} |{na}")
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": threads, "height": args.height, "width": args.width,
                       "parity": parity, "onnx_parity": onnx_parity, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
