"""Training cost of `domainmerge adapt`: seconds per iteration, peak memory, data-loading speed.

Part 1 (compute): full self-training iterations (``domainmerge.training.adapt``: source loss and
feature distance, teacher pseudo-labels, ClassMix, backward passes, AdamW, EMA) of
daformer_mitb5, daformer_r101 (DAFormer recipe, 512x512 crops) and hrda_mitb5 (HRDA recipe,
1024x1024 crops with 512 detail crops), batch 2 per domain as the authors train, random weights.
Images come from memory at the crop size, so only compute is timed; on the CPU the process's
CPU seconds per iteration (all threads) are shown beside the wall time, as a busy machine
inflates the latter. Each configuration runs in
a child process: peak memory is the child's peak RSS on CPU, ``torch.cuda.max_memory_allocated``
on CUDA. The first iteration is a warm-up and not timed. CPU runs fp32; CUDA runs fp32 and bf16
autocast when a GPU is present.

Part 2 (data): images/s that ``TrainSet`` + ``batches`` deliver from Cityscapes-sized PNGs
(2048x1024 images and train-id labels, generated in the real layout in a temporary folder) for
0, 1, 2 worker processes (timed over at least 10 batches from the loader's start, worker
start-up included), with the DAFormer (resize to 1024x512, 512 crop) and HRDA (native,
1024 crop) geometry. Compare with part 1's images/s (2 x batch per iteration) to see whether
loading or compute bounds a run.

    python benchmarks/bench_train.py [--archs ...] [--batch-size 2] [--iters 2] [--crop-scale 1.0]
        [--devices cpu cuda] [--threads N] [--images 8] [--workers 0 1 2] [--skip-compute] [--skip-data]

``--crop-scale 0.25`` shrinks every crop (and HRDA's detail crop) for a quick CPU run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ARCH_RECIPE = {"daformer_mitb5": "daformer", "daformer_r101": "daformer", "hrda_mitb5": "hrda"}


class MemoryReader:
    """An in-memory labelled set (the shape of SyntheticDataset) of blocky scenes at a fixed size."""

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


def one_config(arch: str, device: str, amp: str | None, batch: int, iters: int, crop_scale: float,
               threads: int | None) -> dict[str, Any]:
    """Run warm-up + ``iters`` iterations of adapt in this process; seconds/iteration and peak memory."""
    from domainmerge.data.training import CropConfig, recipe_crops
    from domainmerge.training.adapt import AdaptConfig, adapt
    from domainmerge.training.recipe import get_recipe

    if threads:
        torch.set_num_threads(threads)
    recipe = get_recipe(ARCH_RECIPE[arch])
    # the recipe's crop on Cityscapes-sized targets (the resize happens at load time, not timed here)
    real_crop = recipe_crops(recipe.name, "cityscapes", "cityscapes")[1].crop
    assert real_crop is not None
    def scaled(hw: tuple[int, int]) -> tuple[int, int]:
        return int(hw[0] * crop_scale) // 32 * 32, int(hw[1] * crop_scale) // 32 * 32

    crop = scaled(real_crop)
    options: dict[str, Any] = {}
    if recipe.hrda:
        detail = scaled(recipe.detail_crop)
        options["hr_crop_size"] = detail
        recipe = recipe.replace(detail_crop=detail)
    # rare-class thresholds scale with the crop's area so sampling behaves as at full size
    area = crop_scale ** 2
    recipe = recipe.replace(iters=iters + 1, batch_size=batch, rcs_min_pixels=int(recipe.rcs_min_pixels * area),
                            ignore_top=int(recipe.ignore_top * crop_scale),
                            ignore_bottom=int(recipe.ignore_bottom * crop_scale))
    source, target = MemoryReader(4 * batch, crop, 0), MemoryReader(4 * batch, crop, 1)
    cfg = AdaptConfig(source=source, target=target, arch=arch, arch_options=options, recipe=recipe,
                      source_crop=CropConfig(None, crop), target_crop=CropConfig(None, crop), amp=amp,
                      device=device, progress=False, val_every=0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # adapt times its iterations with time.perf_counter(); a shim notes the process CPU time at each
    # of those calls too, so CPU seconds per iteration are known (robust to a busy machine).
    cpu_marks: list[float] = []

    def perf_counter() -> float:
        cpu_marks.append(time.process_time())
        return time.perf_counter()

    adapt_module = sys.modules[adapt.__module__]
    adapt_module.time = SimpleNamespace(perf_counter=perf_counter)  # type: ignore[attr-defined]
    start = time.perf_counter()
    try:
        result = adapt(cfg, log=lambda _: None)
    finally:
        adapt_module.time = time  # type: ignore[attr-defined]
    total = time.perf_counter() - start
    timed = result.records[1:]
    images = 2 * batch
    s_per_it = float(np.mean([images / r["images_per_s"] for r in timed]))
    # one mark before the loop and one per iteration: CPU per timed iteration when the count fits
    cpu_per_it = (float(np.mean(np.diff(cpu_marks)[1:])) if len(cpu_marks) == len(result.records) + 1
                  else float("nan"))
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"arch": arch, "device": device, "amp": amp or "fp32", "crop": crop, "batch": batch,
            "s_per_iter": s_per_it, "cpu_s_per_iter": cpu_per_it, "images_per_s": images / s_per_it,
            "peak_bytes": peak, "total_s": total,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}


def run_child(arch: str, device: str, amp: str | None, args: argparse.Namespace) -> dict[str, Any] | str:
    spec = json.dumps([arch, device, amp, args.batch_size, args.iters, args.crop_scale, args.threads])
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def compute_table(args: argparse.Namespace) -> None:
    print(f"## Training iterations (batch {args.batch_size} per domain, crop scale {args.crop_scale}, "
          f"{args.iters} timed after 1 warm-up; torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} CPU threads)\n")
    print("| arch | device | precision | crop | s/iter | CPU s/iter | images/s | peak memory |")
    print("|:--|:--|:--|:--|--:|--:|--:|--:|")
    for device in args.devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("| - | cuda | - | - | (no CUDA device) | | | |")
            continue
        for arch in args.archs:
            for amp in ([None, "bf16"] if device == "cuda" else [None]):
                r = run_child(arch, device, amp, args)
                if isinstance(r, str):
                    print(f"| {arch} | {device} | {amp or 'fp32'} | | failed: {r} | | | |", flush=True)
                    continue
                crop = "x".join(map(str, r["crop"]))
                print(f"| {arch} | {r['device_name']} | {r['amp']} | {crop} | {r['s_per_iter']:.2f} | "
                      f"{r['cpu_s_per_iter']:.2f} | {r['images_per_s']:.2f} | {r['peak_bytes'] / 2**30:.2f} GiB |",
                      flush=True)


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


def data_table(args: argparse.Namespace) -> None:
    from domainmerge.data import build_dataset
    from domainmerge.data.training import TrainSet, batches, recipe_crops

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cityscapes"
        t0 = time.perf_counter()
        write_cityscapes(root, args.images)
        size = sum(p.stat().st_size for p in (root / "leftImg8bit").rglob("*.png")) / args.images
        print(f"\n## Data loading: {args.images} generated 2048x1024 Cityscapes PNGs "
              f"({size / 2**20:.1f} MiB per image, written in {time.perf_counter() - t0:.1f} s), "
              f"batch {args.batch_size}\n")
        print("| geometry | workers | images/s | ms/image |")
        print("|:--|--:|--:|--:|")
        reader = build_dataset("cityscapes", root, "train")
        for recipe in ("daformer", "hrda"):
            # the source geometry (labels read, cat_max_ratio tested) on Cityscapes-sized files
            crop, _ = recipe_crops(recipe, "cityscapes", "cityscapes")
            geometry = f"{recipe}: resize {crop.scale}, crop {crop.crop}"
            ts = TrainSet(reader, crop, seed=0)
            n_batches = max(10, args.images // args.batch_size)
            for workers in args.workers:
                # Timed from the iterator's creation (worker start-up included): timing only after a
                # first batch would let prefetched batches arrive for free and overstate the rate.
                start = time.perf_counter()
                it = batches(ts, args.batch_size, start_iter=0, workers=workers)
                for _ in range(n_batches):
                    next(it)
                elapsed = time.perf_counter() - start
                del it
                ips = n_batches * args.batch_size / elapsed
                print(f"| {geometry} | {workers} | {ips:.2f} | {1000 / ips:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCH_RECIPE), choices=list(ARCH_RECIPE))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up")
    parser.add_argument("--crop-scale", type=float, default=1.0)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--images", type=int, default=8, help="generated PNGs for the data part")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--skip-compute", action="store_true")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_config(*json.loads(args.child))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_compute:
        compute_table(args)
    if not args.skip_data:
        data_table(args)


if __name__ == "__main__":
    main()
