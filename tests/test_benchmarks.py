"""The benchmark scripts still run against the library (they are not imported anywhere else, so
an API change can break them silently: bench_train failed on CUDA that way). Figures are not
checked, only that a configuration runs end to end and reports sane values."""

import collections
import importlib.util
import math
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_runs_one_configuration_at_a_small_crop() -> None:
    bench = _load("bench_train")
    threads = torch.get_num_threads()
    try:
        r = bench.one_config("daformer_r101:fp32", "cpu", batch=1, warmup=1, iters=1, profile_iters=1,
                             crop_scale=1 / 16, threads=1)
    finally:
        torch.set_num_threads(threads)
    # the DAFormer recipe's 512 crop scaled by 1/16
    assert tuple(r["crop"]) == (32, 32) and r["batch"] == 1 and r["amp"] == "fp32"
    assert math.isfinite(r["s_per_iter"]) and r["s_per_iter"] > 0 and r["peak_bytes"] > 0
    assert r["hours_40k"] == r["s_per_iter"] * 40_000 / 3600
    # issue 22 measured 11.1 TFLOP per iteration at 512 crops and batch 2; FLOPs scale with the
    # area (1/256) and the batch (1/2): about 22 GFLOP here
    assert 1e10 < r["tflop_per_iter"] * 1e12 < 4e10
    assert r["kernels"] == 0 and r["scalar_reads"] > 0   # no CUDA kernels on the CPU


def test_bench_train_profile_summary_counts_busy_time_once() -> None:
    bench = _load("bench_train")
    # overlapping and nested intervals count once, gaps not at all
    assert bench.busy_intervals([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert bench.busy_intervals([]) == 0
    assert bench.parse_config("hrda_mitb5:bf16:mic")["mic"] and bench.parse_config("hrda_mitb5:bf16")["amp"] == "bf16"
    assert bench.parse_config("daformer_mitb5:bf16:cg")["cg"] and not bench.parse_config("daformer_mitb5:bf16")["cg"]


def test_profile_ops_counts_the_kernel_launching_operators_per_function() -> None:
    from torch.profiler import ProfilerActivity, profile

    from domainmerge.tensors import normalize

    ops_module = _load("profile_ops")
    images = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    normalize(images)   # the constants are made once per device
    verbose = torch._C._profiler._ExperimentalConfig(verbose=True)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True, experimental_config=verbose) as prof:
        normalize(images)
    ops = ops_module.kernel_ops(prof)
    # (x.float() - mean) / std: a cast, a subtraction, a division; views and allocations launch nothing
    assert sorted(e.name for e in ops) == ["aten::copy_", "aten::div", "aten::sub"]
    assert {ops_module.where(e).split()[-1] for e in ops} == {"normalize"}


def test_profile_ops_cuda_model_drops_the_cpus_input_casts_and_groups_multi_tensor_operators() -> None:
    """A float32 += bf16 add is two CPU operators (the CPU kernel casts its bf16 input to a float32
    temporary first) but one CUDA kernel; a multi-tensor copy of 130 tensors is 130 CPU copies but
    ceil(130 / 64) = 3 launches of CUDA's multi_tensor_apply; a resize is no kernel anywhere. An
    autocast cast stays a kernel."""
    from torch.profiler import ProfilerActivity, profile

    ops_module = _load("profile_ops")
    acc, g = torch.zeros(8), torch.ones(8, dtype=torch.bfloat16)
    highs = [torch.randn(3) for _ in range(130)]
    lows = [h.to(torch.bfloat16) for h in highs]
    w = torch.randn(4, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.empty(0).resize_(8)   # an allocation, no kernel
        acc.add_(g)
        torch._foreach_copy_(lows, highs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(torch.randn(2, 8), w)   # casts the input and the weight, then mm
    ops = ops_module.kernel_ops(prof)
    names = collections.Counter(e.name for e in ops)
    assert names["aten::add_"] == 1 and names["aten::copy_"] == 1 + 130 + 2, names
    assert names["aten::resize_"] == 1
    assert ops_module.cuda_model(ops) == len(ops) - 1 - 1 - 130 + 3


def test_bench_grad_shadow_runs_both_forms_to_the_same_gradients() -> None:
    from domainmerge.training.shadows import GradShadow

    bench = _load("bench_grad_shadow")
    net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    x = torch.randn(2, 8)
    grads = []
    for shadow in (None, GradShadow(net, torch.bfloat16)):
        bench.iteration(net, x, shadow, passes=3)
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True)) and len(grads[0]) == 8
