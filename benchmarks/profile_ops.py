"""Where the operators of one training iteration come from: the operators that would launch a
device kernel (leaf ``aten::`` operators that are not views or allocations), counted per
domainmerge function, from ``torch.profiler`` with stacks over one ``Trainer.step`` (the
iteration less ``Trainer.update``, whose AdamW and EMA are a few multi-tensor kernels on CUDA).

Runs on the CPU (or any device) at a small crop: the operator count of an iteration does not
depend on the crop size, so a CPU run at ``--crop-scale 0.0625`` shows where the ~10,000 kernel
launches per iteration of a GPU run come from. ``bf16`` configurations run under CPU autocast,
whose casts (``aten::_to_copy``) are counted as on CUDA. Each count also comes as a CUDA model
(:func:`cuda_model`): without the casts a CPU kernel makes of an input of another dtype, which
CUDA's element-wise kernels do as they read, with a multi-tensor operator as one launch per 64
tensors instead of the CPU's loop over them, and without ``resize_`` and ``as_strided_``.

    python benchmarks/profile_ops.py --configs daformer_mitb5:bf16 hrda_mitb5:bf16:mic \
        [--crop-scale 0.0625] [--top 25] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import torch

# operators that launch no kernel: views, metadata, allocations
NO_KERNEL = re.compile(r"aten::(view|_?reshape|_unsafe_view|transpose|t|permute|expand|as_strided|slice|select|"
                       r"unsqueeze|squeeze|flatten|unflatten|detach|alias|empty|empty_strided|empty_like|"
                       r"resolve_conj|resolve_neg|lift_fresh|split|chunk|unbind|narrow|contiguous|"
                       r"_has_compatible_shallow_copy_type|is_nonzero|result_type|size|stride|numel|"
                       r"set_|_local_scalar_dense|item|broadcast_tensors|expand_as|view_as|type_as|"
                       r"to|_to_dtype|dim|pin_memory|is_pinned|_pin_memory)$")
SRC = re.compile(r"domainmerge/(.+\.py)\((\d+)\): (\S+)")


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("bench_train.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_ops(prof: Any) -> list[Any]:
    """The profile's leaf operators that would be a kernel each (an op with no aten children)."""
    events = prof.events()
    out = []
    for e in events:
        if not e.name.startswith("aten::") or NO_KERNEL.match(e.name):
            continue
        if any(c.name.startswith("aten::") and not NO_KERNEL.match(c.name) for c in e.cpu_children):
            continue   # a composite: its children are counted
        out.append(e)
    return out


# element-wise operators whose CPU kernels first cast an input of another dtype to a temporary
# (aten::to inside the operator); CUDA's kernels convert while they read (dynamic casting)
CASTS_IN_KERNEL_ON_CUDA = re.compile(r"aten::(add|sub|mul|div|where|eq|ne|gt|ge|lt|le|maximum|minimum|"
                                     r"addcmul|addcdiv|lerp)_?$")
FOREACH_TENSORS_PER_LAUNCH = 64   # multi_tensor_apply's list chunk for two tensor lists (CUDA)
# metadata and allocation operators that the CPU count has always included (its figures stay
# comparable across sessions) but that launch no kernel on any device
NO_KERNEL_ANYWHERE = ("aten::resize_", "aten::as_strided_")


def _ancestor(e: Any, depth: int) -> Any:
    for _ in range(depth):
        e = e.cpu_parent if e is not None else None
    return e


def cuda_model(ops: list[Any]) -> int:
    """The CPU count turned into an estimate of CUDA's kernel launches: a CPU kernel's cast of an
    input of another dtype (``copy_ < _to_copy < to < add_``) is no kernel on CUDA, a
    multi-tensor (``_foreach_``) operator, a loop of per-tensor operators on the CPU, launches one
    kernel per ``FOREACH_TENSORS_PER_LAUNCH`` tensors on CUDA, and ``NO_KERNEL_ANYWHERE`` are
    left out."""
    n, foreach = 0, collections.Counter()
    for e in ops:
        if e.name in NO_KERNEL_ANYWHERE:
            continue
        up = e
        while up is not None and not up.name.startswith("aten::_foreach_"):
            up = up.cpu_parent
        if up is not None:
            foreach[id(up)] += 1
            continue
        to, op = _ancestor(e, 2), _ancestor(e, 3)
        if e.name == "aten::copy_" and to is not None and to.name == "aten::to" \
                and op is not None and CASTS_IN_KERNEL_ON_CUDA.match(op.name):
            continue
        n += 1
    return n + sum(-(-k // FOREACH_TENSORS_PER_LAUNCH) for k in foreach.values())


def where(e: Any) -> str:
    """The innermost domainmerge function of an event's stack (the profiler's Python frames name
    functions, not lines); the operators of a backward pass are
    reported at the line that called ``backward`` (the engine runs them without a Python stack
    of their own)."""
    stack = e.stack or []
    backward = any("torch/autograd/" in frame or "_tensor.py" in frame for frame in stack)
    for frame in stack:
        m = SRC.search(frame)
        if m:
            return f"{m.group(1)}:{m.group(2)} {m.group(3)}" + (" (backward)" if backward else "")
    return "?"


def profile_config(spec: str, crop_scale: float, batch: int, threads: int | None) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from domainmerge.training.adapt import LossLog

    bench = _bench()
    tr, tmp = bench.make_trainer(spec, "cpu", batch, 4, crop_scale, threads)
    log = LossLog(1, 2 * batch)
    for it in range(2):   # warm-up: first-iteration caches
        log.add(it, tr.step(it))
        tr.update(it)
    log.flush()
    verbose = torch._C._profiler._ExperimentalConfig(verbose=True)   # stacks on the operators (torch >= 2.5)
    # step only: update's AdamW and EMA run per tensor on the CPU (about 20,000 operators for
    # MiT-B5) but as a few multi-tensor kernels on CUDA (fused AdamW, foreach EMA and re-cast)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True, experimental_config=verbose) as prof:
        log.add(2, tr.step(2))
    tr.update(2)
    ops = kernel_ops(prof)
    by_line = collections.Counter(where(e) for e in ops)
    by_name = collections.Counter(e.name for e in ops)
    if tmp is not None:
        tmp.cleanup()
    return {"config": spec, "crop_scale": crop_scale, "kernel_ops": len(ops), "cuda_model": cuda_model(ops),
            "by_line": by_line.most_common(),
            "by_name": by_name.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["daformer_mitb5:bf16", "hrda_mitb5:bf16:mic"])
    parser.add_argument("--crop-scale", type=float, default=0.0625)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for spec in args.configs:
        r = profile_config(spec, args.crop_scale, args.batch_size, args.threads)
        results.append(r)
        print(f"\n## {spec}: {r['kernel_ops']} kernel-launching operators per iteration (torch {torch.__version__}); "
              f"CUDA model: {r['cuda_model']}")
        print("\n| source line | ops |\n|:--|--:|")
        for line, n in r["by_line"][:args.top]:
            print(f"| {line} | {n} |")
        print("\n| operator | ops |\n|:--|--:|")
        for name, n in r["by_name"][:args.top]:
            print(f"| {name} | {n} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
