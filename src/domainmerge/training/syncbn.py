"""BatchNorm over the global batch of a multi-process run.

On CUDA torch's ``nn.SyncBatchNorm`` does it; it refuses CPU tensors, so CPU (gloo) runs use
:class:`GlobalBatchNorm2d`: per-channel sums of x and the pixel count, then of the squared
deviations from the global mean, are summed over ranks with the autograd-aware
``torch.distributed.nn.functional.all_reduce`` (whose backward sums the gradients over ranks),
which gives the statistics, and their gradients, of one process that holds the whole batch.
Without it, 2 ranks x batch 1 would normalise each image by itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the batch summed over all ranks."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        # Two passes (mean, then the squared deviations from it), as one process's BatchNorm does:
        # E[x^2] - E[x]^2 in float32 cancels catastrophically for channels whose mean dwarfs their
        # spread, which made 2 ranks' gradients differ from one process's by 1 % on some CPUs.
        total = all_reduce(torch.cat([xf.sum((0, 2, 3)), xf.new_tensor([x.numel() / c])]))
        n = total[-1]
        mean = total[:c] / n
        var = all_reduce(((xf - mean.view(1, c, 1, 1)) ** 2).sum((0, 2, 3))) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm computing global-batch statistics (in place where possible)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d   # same parameters and buffers, global statistics
    return model
