"""Training cost of `domainmerge adapt` per configuration, evaluation speed, data-loading speed.

Part 1 (training): full self-training iterations (``Trainer.step`` + ``Trainer.update`` as
``adapt`` runs them: source loss and feature distance, teacher pseudo-labels, ClassMix and strong
augmentation, MIC when asked, backward passes, AdamW, EMA; losses read once at the end of the
timed window, as ``adapt`` reads them every ``log_every`` iterations) at the authors' crops and
batch 2 per domain, random weights, in-memory crops (only compute is timed; ``:png`` reads
generated Cityscapes-sized PNGs through ``--png-workers`` loader processes instead). Per
configuration, each in a child process:

- s/iter: wall time of the timed iterations after the warm-ups, the device synchronised at both
  ends; CPU s/iter (all threads of the process) beside it; hours for 40k iterations;
- first iteration: seconds of the first warm-up (``:compile``: the compile time shows here);
- GPU busy: the union of the kernel (and copy) intervals that ``torch.profiler`` records over
  ``--profile-iters`` further iterations, per iteration, over the un-profiled s/iter;
- kernels and host syncs per iteration (from the same profile: kernel launches,
  ``cuda*Synchronize`` calls and device-to-host copies; on the CPU the scalar reads
  ``aten::_local_scalar_dense`` of .item()/float()/bool());
- TFLOP per iteration (``torch.utils.flop_counter.FlopCounterMode``: matrix products,
  convolutions and attention, forward and backward) and TFLOP/s at the timed rate;
- peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the child's peak RSS on the CPU.

Configurations are ``ARCH:PRECISION[:mic][:cl][:compile][:cg][:blocks][:onepass][:tf32][:cudnn][:png]`` (``cl``:
channels_last; ``cg``: ``--compile reduce-overhead``, the compiled parts replayed as CUDA graphs;
``blocks``: ``--compile-blocks``, the backbone compiled block by block (with ``cg`` too: graphs per block);
``onepass``: ``--one-pass``, the student's views in one forward and one backward;
``tf32``: TF32 matrix products in fp32; ``cudnn``: ``cudnn.benchmark`` autotuning;
defaults: the five rows of the README's table).

Part 2 (evaluation, ``--evaluate``): ``evaluate_model`` of hrda_mitb5 in slide mode (1024 windows,
stride 512, the authors' Cityscapes test setting) on 2048x1024 images held in memory, bf16
autocast on CUDA: images/s and GPU busy as above.

Part 3 (data, ``--data``): images/s that ``TrainSet`` + ``batches`` deliver from Cityscapes-sized
PNGs (2048x1024 images and train-id labels, generated in the real layout in a temporary folder)
for each of ``--workers``, with the DAFormer (resize to 1024x512, 512 crop) and HRDA (native,
1024 crop) geometry, timed over at least 10 batches from the loader's start (worker start-up
included).

    python benchmarks/bench_train.py [--configs daformer_mitb5:bf16 ...] [--device cuda]
        [--batch-size 2] [--warmup 2] [--iters 6] [--profile-iters 1] [--crop-scale 1.0]
        [--evaluate] [--data] [--workers 0 1 2] [--images 8] [--json OUT.json]

``--crop-scale 0.25`` shrinks every crop (and HRDA's detail crop) for a quick CPU run. Prints
Markdown tables; ``--json`` also writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARCH_RECIPE = {"daformer_mitb5": "daformer", "daformer_r101": "daformer", "hrda_mitb5": "hrda",
               "daformer_mitb0": "daformer", "hrda_mitb0": "hrda"}
DEFAULT_CONFIGS = ["daformer_mitb5:fp32", "daformer_mitb5:bf16", "daformer_r101:bf16", "hrda_mitb5:bf16",
                   "hrda_mitb5:bf16:mic"]
FLAGS = {"mic", "cl", "compile", "cg", "blocks", "onepass", "tf32", "cudnn", "png"}
ITERS_40K = 40_000


class MemoryReader:
    """An in-memory labelled set (the shape of SyntheticDataset) of blocky scenes at a fixed size."""

    in_memory = True

    def __init__(self, n: int, size: tuple[int, int], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        h, w = size
        coarse = torch.randint(0, 19, (n, 1, 8, 8), generator=g).float()
        self.labels = torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
        colours = torch.randint(0, 256, (19, 3), generator=g)
        noise = torch.randint(-20, 21, (n, 3, h, w), generator=g)
        self.images = (colours[self.labels].permute(0, 3, 1, 2) + noise).clamp(0, 255).to(torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.images[i], self.labels[i], str(i)


def parse_config(spec: str) -> dict[str, Any]:
    """'hrda_mitb5:bf16:mic' -> {'arch', 'amp', flags...}; a bad spec is a one-line error."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] not in ARCH_RECIPE or parts[1] not in ("fp32", "bf16", "fp16") \
            or not set(parts[2:]) <= FLAGS:
        raise SystemExit(f"--configs {spec}: write ARCH:PRECISION[:FLAG...] with ARCH in {sorted(ARCH_RECIPE)}, "
                         f"PRECISION fp32/bf16/fp16, FLAG in {sorted(FLAGS)}")
    flags: dict[str, Any] = {f: f in parts[2:] for f in FLAGS}
    # the AdaptConfig.compile value: ':cg' is the reduce-overhead mode
    flags["compile"] = "reduce-overhead" if flags["cg"] else flags["compile"] or flags["blocks"]
    return {"spec": spec, "arch": parts[0], "amp": None if parts[1] == "fp32" else parts[1], **flags}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def busy_intervals(events: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (overlapping kernels counted once)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(events):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def profile_summary(prof: Any, n: int) -> dict[str, float]:
    """Per-iteration device busy seconds, kernel launches, host syncs and scalar reads of a
    ``torch.profiler`` run over ``n`` iterations."""
    device_spans, kernels, syncs, dtoh, scalars = [], 0, 0, 0, 0
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            device_spans.append((e.time_range.start, e.time_range.end))
            kernels += not name.startswith("Memcpy") and not name.startswith("Memset")
            dtoh += name.startswith("Memcpy DtoH")
        elif name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs += 1
        elif name == "aten::_local_scalar_dense":
            scalars += 1
    return {"device_busy_s": busy_intervals(device_spans) / 1e6 / n, "kernels": kernels / n, "syncs": syncs / n,
            "dtoh_copies": dtoh / n, "scalar_reads": scalars / n}


def top_ops(prof: Any, n: int, k: int = 12) -> dict[str, list[list[Any]]]:
    """The ``k`` operators with the most self time per iteration on the device (kernels) and on the
    host (CPU ops, cudaLaunchKernel included): [name, ms per iteration, calls per iteration]."""
    averages = prof.key_averages()

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    def rows(key: Any) -> list[list[Any]]:
        ranked = sorted(averages, key=key, reverse=True)[:k]
        return [[e.key[:80], round(key(e) / 1e3 / n, 3), round(e.count / n, 1)] for e in ranked if key(e) > 0]

    return {"device": rows(device_us), "cpu": rows(lambda e: float(e.self_cpu_time_total))}


def make_trainer(spec: str, device: str, batch: int, iters: int, crop_scale: float, threads: int | None,
                 png_workers: int = 8) -> tuple[Any, Any]:
    """The Trainer of configuration ``spec`` (schedule of ``iters`` iterations) at ``crop_scale`` of
    the authors' crops, and the temporary folder of the ``:png`` files (None without)."""
    from domainmerge.data.training import CropConfig, recipe_crops
    from domainmerge.training.adapt import AdaptConfig, Trainer
    from domainmerge.training.recipe import get_recipe

    c = parse_config(spec)
    if threads:
        torch.set_num_threads(threads)
    if c["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
    if c["cudnn"]:   # autotuned convolution algorithms (fixed shapes; float rounding may change)
        torch.backends.cudnn.benchmark = True
    recipe = get_recipe(ARCH_RECIPE[c["arch"]], mic=c["mic"])
    real_crop = recipe_crops(recipe.name, "cityscapes", "cityscapes")[1].crop
    assert real_crop is not None

    def scaled(hw: tuple[int, int]) -> tuple[int, int]:
        return max(32, int(hw[0] * crop_scale) // 32 * 32), max(32, int(hw[1] * crop_scale) // 32 * 32)

    crop = scaled(real_crop)
    options: dict[str, Any] = {}
    if recipe.hrda:
        detail = scaled(recipe.detail_crop)
        options["hr_crop_size"] = detail
        recipe = recipe.replace(detail_crop=detail)
    area = crop_scale ** 2   # rare-class thresholds and ignored rows scale with the crop
    recipe = recipe.replace(iters=iters, batch_size=batch, rcs_min_pixels=int(recipe.rcs_min_pixels * area),
                            ignore_top=int(recipe.ignore_top * crop_scale),
                            ignore_bottom=int(recipe.ignore_bottom * crop_scale))
    tmp = None
    if c["png"]:   # end to end: the recipe's resize and crop of Cityscapes-sized files
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name) / "cityscapes"
        write_cityscapes(root, 8)
        source = target = ("cityscapes", root, "train")
        src_crop, tgt_crop = recipe_crops(recipe.name, "cityscapes", "cityscapes")
        src_crop = CropConfig(src_crop.scale, crop, cat_max_ratio=src_crop.cat_max_ratio)
        tgt_crop = CropConfig(tgt_crop.scale, crop, cat_max_ratio=1.0)
        recipe = recipe.replace(rcs=False)   # the generated set is too small for rare-class statistics
        workers = png_workers
    else:
        source, target = MemoryReader(4 * batch, crop, 0), MemoryReader(4 * batch, crop, 1)
        src_crop = tgt_crop = CropConfig(None, crop)
        workers = 0
    cfg = AdaptConfig(source=source, target=target, arch=c["arch"], arch_options=options, recipe=recipe,
                      source_crop=src_crop, target_crop=tgt_crop, amp=c["amp"], device=device, progress=False,
                      val_every=0, workers=workers, compile=c["compile"], compile_blocks=c["blocks"],
                      one_pass=c["onepass"], channels_last=c["cl"])
    return Trainer(cfg, log=lambda _: None), tmp


def one_config(spec: str, device: str, batch: int, warmup: int, iters: int, profile_iters: int, crop_scale: float,
               threads: int | None, png_workers: int = 8, count_flops: bool = True) -> dict[str, Any]:
    """Time one configuration in this process (the benchmark runs it in a child)."""
    from domainmerge.training.adapt import LossLog

    c = parse_config(spec)
    tr, tmp = make_trainer(spec, device, batch, warmup + iters + profile_iters + 1, crop_scale, threads, png_workers)
    cuda = device.startswith("cuda")
    it = 0

    def run(n: int) -> None:
        nonlocal it
        log = LossLog(1, 2 * batch)
        for _ in range(n):
            log.add(it, tr.step(it))
            tr.update(it)
            it += 1
        log.flush()   # one host read per window, as adapt does every log_every iterations

    t0 = time.perf_counter()
    run(1)
    _sync(device)
    first = time.perf_counter() - t0
    run(warmup - 1)
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    run(iters)
    _sync(device)
    s_per_it = (time.perf_counter() - t0) / iters
    cpu_per_it = (time.process_time() - c0) / iters
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run(profile_iters)
        _sync(device)
    prof_summary = profile_summary(prof, profile_iters)
    top = top_ops(prof, profile_iters)
    flops = float("nan")
    # the counter sees the eager operators; a compiled run does the same work
    if not c["compile"] and count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            run(1)
        flops = float(counter.get_total_flops())
    if tmp is not None:
        tmp.cleanup()
    return {"config": spec, "arch": c["arch"], "device": device, "amp": c["amp"] or "fp32", "crop": list(tr.crop_hw),
            "batch": batch, "iters": iters, "s_per_iter": s_per_it, "cpu_s_per_iter": cpu_per_it,
            "first_iter_s": first, "hours_40k": s_per_it * ITERS_40K / 3600, "peak_bytes": peak,
            "tflop_per_iter": flops / 1e12, "tflops": flops / 1e12 / s_per_it,
            "gpu_busy": prof_summary["device_busy_s"] / s_per_it if cuda else float("nan"), **prof_summary,
            "top": top, "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}


def evaluate_config(device: str, images: int, size: tuple[int, int], arch: str, amp: str | None,
                    threads: int | None) -> dict[str, Any]:
    """evaluate_model of ``arch`` (HRDA slide, windows 1024 / stride 512 scaled with ``size``) on
    ``images`` in-memory images: images/s, GPU busy, peak memory."""
    from domainmerge.evaluation.inference import default_batch_size, evaluate_model
    from domainmerge.models import build_model

    if threads:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    model = build_model(arch).to(device).eval()
    window = (size[0] // 2, size[0] // 2) if size[0] < 1024 else (1024, 1024)
    stride = (window[0] // 2, window[1] // 2)
    data = MemoryReader(images, size, 0)
    kw = {"mode": "slide", "crop": window, "stride": stride, "device": device, "amp": amp, "progress": False}
    batch = default_batch_size(data, torch.device(device), mode="slide", crop=window, stride=stride)
    # Three passes over the same images, so that all see the same batches (a batch of another size
    # builds new convolution plans and allocator blocks): a warm-up, the timed pass, and the
    # profiled pass whose kernel time, over the timed pass's, is the busy share.
    t0 = time.perf_counter()
    evaluate_model(model, data, **kw)
    _sync(device)
    first = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    evaluate_model(model, data, **kw)
    _sync(device)
    s_per_image = (time.perf_counter() - t0) / images
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        evaluate_model(model, data, **kw)
        _sync(device)
    summary = profile_summary(prof, images)
    summary["batch"] = batch
    summary["top"] = top_ops(prof, images)
    return {"config": f"evaluate {arch} slide {window[0]}/{stride[0]}", "device": device, "amp": amp or "fp32",
            "size": list(size), "images": images, "s_per_image": s_per_image, "images_per_s": 1 / s_per_image,
            "first_s": first, "gpu_busy": summary["device_busy_s"] / s_per_image if cuda else float("nan"),
            **summary, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}


def run_child(kind: str, payload: list[Any], timeout: float | None) -> dict[str, Any] | str:
    """One measurement in a fresh process (its own peak memory, no state from the others)."""
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, payload])], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def training_table(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    print(f"## Training iterations on {args.device} (batch {args.batch_size} per domain, crop scale "
          f"{args.crop_scale}, {args.iters} timed after {args.warmup} warm-ups, profile over "
          f"{args.profile_iters}; torch {torch.__version__})\n", flush=True)
    print("| configuration | crop | s/iter | CPU s/iter | GPU busy | kernels/iter | syncs/iter | TFLOP/iter | "
          "TFLOP/s | peak memory | 40k iterations | first iteration |")
    print("|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|", flush=True)
    for spec in args.configs:
        r = run_child("train", [spec, args.device, args.batch_size, args.warmup, args.iters, args.profile_iters,
                                args.crop_scale, args.threads, args.png_workers, not args.skip_flops], args.timeout)
        if isinstance(r, str):
            print(f"| {spec} | | failed: {r} | | | | | | | | | |", flush=True)
            results.append({"config": spec, "error": r})
            continue
        results.append(r)
        syncs = _syncs(r, args.device)
        print(f"| {spec} | {'x'.join(map(str, r['crop']))} | {r['s_per_iter']:.3f} | {r['cpu_s_per_iter']:.3f} | "
              f"{_fmt(100 * r['gpu_busy'], '.0f')} % | {r['kernels']:.0f} | {syncs:.0f} | "
              f"{_fmt(r['tflop_per_iter'], '.2f')} | {_fmt(r['tflops'], '.1f')} | {r['peak_bytes'] / 2**30:.2f} GiB | "
              f"{r['hours_40k']:.1f} h | {r['first_iter_s']:.1f} s |", flush=True)
    print("\nWhere an iteration's time goes (self time per iteration from the profile: ms, calls):")
    for r in results:
        if "top" in r:
            _print_top(r, r["config"])


def _syncs(r: dict[str, Any], device: str) -> float:
    """Host waits per iteration or image: CUDA synchronisations and device-to-host copies; on the
    CPU the scalar reads (.item() and the like)."""
    return float(r["syncs"] + r["dtoh_copies"] if device.startswith("cuda") else r["scalar_reads"])


def _print_top(r: dict[str, Any], label: str) -> None:
    """The six operators with the most self time on the device and on the host."""
    for side in ("device", "cpu"):
        ops = "; ".join(f"{name} {ms:.2f} ms x{calls:g}" for name, ms, calls in r["top"][side][:6])
        print(f"- {label} {side}: {ops or '-'}")


def evaluate_table(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    # small scales stop at 256x512 (windows of 128, whose half-resolution context MiT still takes)
    size = (max(256, int(1024 * args.crop_scale) // 32 * 32), max(512, int(2048 * args.crop_scale) // 32 * 32))
    amp = "bf16" if args.device.startswith("cuda") else None
    print(f"\n## evaluate, HRDA slide inference ({size[0]}x{size[1]} images, batch as evaluate chooses)\n")
    print("| configuration | precision | images per batch | images/s | GPU busy | kernels/image | syncs/image | "
          "peak memory | first pass |")
    print("|:--|:--|--:|--:|--:|--:|--:|--:|--:|", flush=True)
    arch = "hrda_mitb5" if args.crop_scale >= 1 else "hrda_mitb0"
    r = run_child("evaluate", [args.device, args.eval_images, size, arch, amp, args.threads], args.timeout)
    if isinstance(r, str):
        print(f"| evaluate {arch} | {amp or 'fp32'} | | failed: {r} | | | | | |", flush=True)
        results.append({"config": "evaluate", "error": r})
        return
    results.append(r)
    syncs = _syncs(r, args.device)
    print(f"| {r['config']} | {r['amp']} | {r['batch']} | {r['images_per_s']:.2f} | "
          f"{_fmt(100 * r['gpu_busy'], '.0f')} % | {r['kernels']:.0f} | {syncs:.1f} | "
          f"{r['peak_bytes'] / 2**30:.2f} GiB | {r['first_s']:.1f} s |", flush=True)
    _print_top(r, "per image,")


def write_cityscapes(root: Path, n: int) -> None:
    """n Cityscapes-sized (2048x1024) image/label PNG pairs in the Cityscapes layout: synthetic
    street scenes upsampled, plus sensor-like noise so the PNGs compress like photographs."""
    from PIL import Image

    from domainmerge.data.synthetic import make_sample

    img_dir = root / "leftImg8bit" / "train" / "benchcity"
    lab_dir = root / "gtFine" / "train" / "benchcity"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        image, label = make_sample("city", "train", i, size=(128, 256))
        big = torch.nn.functional.interpolate(torch.from_numpy(image)[None].float(), size=(1024, 2048),
                                              mode="bilinear", align_corners=False)[0]
        big = (big + torch.from_numpy(rng.normal(0, 4, big.shape)).float()).clamp(0, 255).to(torch.uint8)
        lab = torch.nn.functional.interpolate(torch.from_numpy(label)[None, None].float(), size=(1024, 2048),
                                              mode="nearest")[0, 0].to(torch.uint8)
        stem = f"benchcity_{i:06d}_000019"
        Image.fromarray(big.permute(1, 2, 0).numpy()).save(img_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(lab.numpy()).save(lab_dir / f"{stem}_gtFine_labelTrainIds.png")


def data_table(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    from domainmerge.data import build_dataset
    from domainmerge.data.training import TrainSet, batches, recipe_crops

    pin = args.pin and torch.cuda.is_available()   # page-locking needs a CUDA driver
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cityscapes"
        t0 = time.perf_counter()
        write_cityscapes(root, args.images)
        size = sum(p.stat().st_size for p in (root / "leftImg8bit").rglob("*.png")) / args.images
        print(f"\n## Data loading: {args.images} generated 2048x1024 Cityscapes PNGs "
              f"({size / 2**20:.1f} MiB per image, written in {time.perf_counter() - t0:.1f} s), "
              f"batch {args.batch_size}, pinned memory {pin}\n")
        print("| geometry | workers | images/s | images/s per worker | ms/image |")
        print("|:--|--:|--:|--:|--:|", flush=True)
        reader = build_dataset("cityscapes", root, "train")
        for recipe in ("daformer", "hrda"):
            # the source geometry (labels read, cat_max_ratio tested) on Cityscapes-sized files
            crop, _ = recipe_crops(recipe, "cityscapes", "cityscapes")
            geometry = f"{recipe}: resize {crop.scale}, crop {crop.crop}"
            ts = TrainSet(reader, crop, seed=0)
            for workers in args.workers:
                n_batches = max(10, 3 * workers, args.images // args.batch_size)
                # Timed from the iterator's creation (worker start-up included): timing only after a
                # first batch would let prefetched batches arrive for free and overstate the rate.
                start = time.perf_counter()
                it = batches(ts, args.batch_size, start_iter=0, workers=workers, pin_memory=pin)
                for _ in range(n_batches):
                    next(it)
                elapsed = time.perf_counter() - start
                del it
                ips = n_batches * args.batch_size / elapsed
                results.append({"config": f"data {recipe}", "workers": workers, "images_per_s": ips,
                                "images_per_s_per_worker": ips / max(workers, 1)})
                print(f"| {geometry} | {workers} | {ips:.2f} | {ips / max(workers, 1):.2f} | {1000 / ips:.0f} |",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (at least 1)")
    parser.add_argument("--iters", type=int, default=6, help="timed iterations")
    parser.add_argument("--profile-iters", type=int, default=1, help="profiled iterations after the timed ones")
    parser.add_argument("--crop-scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--png-workers", type=int, default=8, help="loader processes of the :png configurations")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-flops", action="store_true", help="no FLOP-counted iteration (TFLOP columns '-')")
    parser.add_argument("--evaluate", action="store_true", help="also time evaluate (HRDA slide)")
    parser.add_argument("--eval-images", type=int, default=4)
    parser.add_argument("--data", action="store_true", help="also time data loading from generated PNGs")
    parser.add_argument("--images", type=int, default=8, help="generated PNGs for the data part")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--pin", action="store_true", help="pinned batches in the data part (as adapt on CUDA)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, payload = json.loads(args.child)
        print(json.dumps(one_config(*payload) if kind == "train" else evaluate_config(*payload)))
        return
    for spec in args.configs:
        parse_config(spec)
    for flag in ("warmup", "iters", "profile_iters"):   # each is a divisor or the first-iteration time
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: list[dict[str, Any]] = []
    try:
        if not args.skip_train:
            training_table(args, results)
        if args.evaluate:
            evaluate_table(args, results)
        if args.data:
            data_table(args, results)
    finally:
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
