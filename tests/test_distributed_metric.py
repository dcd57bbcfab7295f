"""Two CPU processes (gloo) each score their shard; the synced result equals one process
scoring everything, computed independently with numpy."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NUM_CLASSES = 5
WORLD = 2


def make_data() -> tuple[np.ndarray, np.ndarray]:
    """7 images (odd, so the shards differ in size), some pixels ignored, class 4 never present."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(7, 6, 9))
    gt[rng.random(gt.shape) < 0.25] = 255
    pred = np.where(rng.random(gt.shape) < 0.5, np.where(gt == 255, 0, gt), rng.integers(0, 4, gt.shape))
    return pred, gt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(rank: int, port: int, out_dir: str) -> None:
    from domainmerge.evaluation.metrics import SegMetric
    from domainmerge.runtime import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        pred, gt = make_data()
        metric = SegMetric(NUM_CLASSES)
        indices = list(distributed.shard_indices(len(gt)))
        for i in indices:
            metric.update(torch.from_numpy(pred[i]), torch.from_numpy(gt[i]))
        local = metric.confusion.clone()
        scores = metric.sync().compute()
        metric.sync()   # a second sync must not double the counts
        torch.save({"indices": indices, "local": local, "confusion": metric.confusion,
                    "miou": scores.miou, "iou": scores.iou}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_sync_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # The shards are disjoint and cover every image once.
    assert sorted(results[0]["indices"] + results[1]["indices"]) == list(range(7))

    pred, gt = make_data()
    keep = gt != 255
    expected = np.bincount(gt[keep] * NUM_CLASSES + pred[keep], minlength=NUM_CLASSES ** 2)
    expected = expected.reshape(NUM_CLASSES, NUM_CLASSES)
    tp = np.diag(expected).astype(float)
    union = expected.sum(0) + expected.sum(1) - tp
    iou = tp[union > 0] / union[union > 0] * 100

    for res in results:
        assert not torch.equal(res["local"], res["confusion"])   # each rank saw only part
        np.testing.assert_array_equal(res["confusion"].numpy(), expected)
        assert abs(res["miou"] - iou.mean()) < 1e-9
        assert np.isnan(res["iou"][4])
    np.testing.assert_array_equal((results[0]["local"] + results[1]["local"]).numpy(), expected)


def _grads(rank: int) -> list[torch.Tensor]:
    """Rank-specific gradients: a channels-last conv weight, a matrix, a vector, one None."""
    g = torch.Generator().manual_seed(rank)
    conv = torch.randn(4, 3, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    return [conv, torch.randn(5, 7, generator=g), torch.randn(11, generator=g)]


def grad_worker(rank: int, port: int, out_dir: str) -> None:
    from domainmerge.runtime import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads(rank)] + [torch.nn.Parameter(torch.zeros(2))]
        for p, g in zip(params, _grads(rank)):
            p.grad = g
        distributed.average_gradients(params, bucket_bytes=150)   # a bucket per tensor or two
        torch.save([p.grad for p in params], Path(out_dir) / f"grads{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_average_gradients_is_the_ranks_mean_in_every_layout(tmp_path: Path) -> None:
    """What DDP's default reduction gives, by hand: (g0 / 2) + (g1 / 2), each gradient in its
    own layout (channels-last stays channels-last), a parameter without a gradient left alone."""
    mp.spawn(grad_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected = [a / WORLD + b / WORLD for a, b in zip(_grads(0), _grads(1))]
    for r in range(WORLD):
        got = torch.load(tmp_path / f"grads{r}.pt", weights_only=True)
        assert got[-1] is None and len(got) == 4
        for g, e in zip(got[:3], expected):
            assert torch.equal(g, e)
        assert got[0].is_contiguous(memory_format=torch.channels_last)
