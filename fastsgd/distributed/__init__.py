"""Data-parallel training: bucketed gradient all-reduce overlapped with
backward, with the fused optimizer step run per bucket.

Modules: ``buckets`` (assignment, flat buffers), ``reducer`` (hooks,
collectives, per-bucket step), ``overlap`` (the optimizer's ``step``),
``sync`` (model checks, broadcasts), ``parallel`` (the public wrapper).
"""
from fastsgd.distributed.parallel import BucketedDataParallel

__all__ = ["BucketedDataParallel"]
