"""Merge speed and peak memory: domainmerge vs a naive merge vs mergekit, on the same files.

Makes two checkpoints of about 70M float32 parameters with BatchNorm layers (equal
num_batches_tracked, since mergekit refuses differing counters), then times each merger in a
fresh process and reads that process's peak resident memory from the kernel (wait4 rusage).

    python benchmarks/bench_merge.py [--params 70] [--repeats 3] [--dir /tmp/dm_bench]
        [--mergekit PATH_TO_mergekit-pytorch] [--methods ties dare_ties ...]

Prints a Markdown table (median wall time, peak RSS, ratios against mergekit and naive). The
task-vector methods (``--methods``) merge the same two inputs against a third checkpoint as the
base, and their rows also give the ratio to domainmerge's linear merge (the issue's memory target:
within 1.5x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

NAIVE_ST = """
import sys, torch
from safetensors.torch import load_file, save_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
out = {}
for k in a:
    if k.endswith("num_batches_tracked"):
        out[k] = a[k] + b[k]
    else:
        out[k] = (a[k] + b[k]) / 2
save_file(out, sys.argv[3])
"""

NAIVE_PTH = """
import sys, torch
ca, cb = torch.load(sys.argv[1], weights_only=True), torch.load(sys.argv[2], weights_only=True)
a, b = ca["state_dict"], cb["state_dict"]
out = {k: (a[k] + b[k]) if k.endswith("num_batches_tracked") else (a[k] + b[k]) / 2 for k in a}
torch.save({"meta": ca["meta"], "state_dict": out}, sys.argv[3])
"""


def make_checkpoint(path: Path, params_m: float, seed: int, fmt: str) -> int:
    """A ResNet-like stack of 3x3 convs with BN, ~params_m million float32 parameters."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    c, total, i = 512, 0, 0
    while total < params_m * 1e6:
        w = torch.randn(c, c, 3, 3, generator=g) * 0.02
        sd[f"backbone.layer{i}.conv.weight"] = w
        sd[f"backbone.layer{i}.bn.weight"] = torch.rand(c, generator=g)
        sd[f"backbone.layer{i}.bn.bias"] = torch.randn(c, generator=g)
        sd[f"backbone.layer{i}.bn.running_mean"] = torch.randn(c, generator=g)
        sd[f"backbone.layer{i}.bn.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"backbone.layer{i}.bn.num_batches_tracked"] = torch.tensor(40000)
        total += w.numel() + 2 * c
        i += 1
    if fmt == "safetensors":
        save_file(sd, path)
    else:
        torch.save({"meta": {"iter": 40000}, "state_dict": sd}, path)
    return total


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def main() -> None:
    if sys.argv[1:2] == ["--make"]:
        path, params, seed, fmt = sys.argv[2:6]
        n = make_checkpoint(Path(path), float(params), int(seed), fmt)
        print(f"wrote {path} ({n / 1e6:.1f}M parameters)", file=sys.stderr)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=70.0, help="millions of parameters per checkpoint")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/dm_bench")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-pytorch"),
                    help="path of mergekit's mergekit-pytorch (skipped when not found)")
    ap.add_argument("--methods", nargs="*", default=["task_arithmetic", "ties", "dare_ties"],
                    help="task-vector methods to measure against a base checkpoint (default: three)")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    dm = [sys.executable, "-m", "domainmerge"]
    rows = []
    for fmt in ("safetensors", "pth"):
        suffix = ".safetensors" if fmt == "safetensors" else ".pth"
        a, b, base = work / f"a{suffix}", work / f"b{suffix}", work / f"base{suffix}"
        for path, seed in ((a, 0), (b, 1), (base, 2)):
            if not path.exists():
                # In a child process: the peak RSS a measured child reports includes whatever its
                # parent held when it was spawned, so this process must stay small.
                subprocess.run([sys.executable, __file__, "--make", str(path), str(args.params), str(seed), fmt],
                               check=True)
        out = work / f"out{suffix}"
        methods = {
            "domainmerge merge": dm + ["merge", str(a), str(b), "-o", str(out), "--force", "--quiet"],
            "naive (load whole, average)": [sys.executable, "-c", NAIVE_ST if fmt == "safetensors" else NAIVE_PTH,
                                            str(a), str(b), str(out)],
        }
        for method in args.methods:
            methods[f"domainmerge merge --method {method}"] = dm + [
                "merge", str(a), str(b), "-o", str(out), "--force", "--quiet", "--method", method, "--base", str(base)]
        if args.mergekit and fmt == "safetensors":
            cfg = work / "mergekit.yml"
            cfg.write_text(f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                           f"  - model: {b}\n    parameters: {{weight: 0.5}}\n"
                           "merge_method: linear\ndtype: float32\n")
            methods["mergekit-pytorch (linear)"] = [args.mergekit, str(cfg), str(work / "mk_out.safetensors")]
        for name, cmd in methods.items():
            measure(cmd)  # warm the page cache and imports
            runs = [measure(cmd) for _ in range(args.repeats)]
            rows.append((fmt, name, statistics.median(r[0] for r in runs), max(r[1] for r in runs)))
    ref = {(f, n): (t, m) for f, n, t, m in rows}
    print(f"\n{args.params:g}M float32 parameters x 2 inputs, median of {args.repeats} runs, "
          f"{os.cpu_count()} CPU cores\n")
    print("| inputs | method | wall time (s) | peak RSS (MB) | time vs mergekit | RSS vs mergekit | time vs naive "
          "| RSS vs linear |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for fmt, name, t, m in rows:
        mk = ref.get((fmt, "mergekit-pytorch (linear)"))
        nv = ref[(fmt, "naive (load whole, average)")]
        lin = ref[(fmt, "domainmerge merge")]
        vs_lin = f"{m / lin[1]:.2f}x" if name.startswith("domainmerge") else "-"
        print(f"| {fmt} | {name} | {t:.2f} | {m:.0f} | {f'{t / mk[0]:.2f}x' if mk else '-'} | "
              f"{f'{m / mk[1]:.2f}x' if mk else '-'} | {t / nv[0]:.2f}x | {vs_lin} |")


if __name__ == "__main__":
    main()
