"""domainmerge.runtime: where and how a computation runs, shared by training, merging, evaluation.

- :mod:`~domainmerge.runtime.device`: the device a run uses (``resolve_device``);
- :mod:`~domainmerge.runtime.precision`: mixed precision with one vocabulary for ``amp``
  (None or 'none': off; 'bf16'; 'fp16'), ``autocast``;
- :mod:`~domainmerge.runtime.distributed`: torch.distributed helpers that degrade to the
  one-process answer (rank, world size, ``all_reduce_sum``, ``init_from_env``, sharding).

A foundation layer: it imports only ``errors`` (and ``fsutil``) of the project.
"""
