"""Counting the large buffers an operation allocates (the classification layer's B x C
figure in benchmarks/bench_gpu.py and its test): a measurement of memory traffic that does
not need a GPU or its allocator statistics."""

from __future__ import annotations

import torch


def count_new_buffers(fn, shape: tuple[int, int]) -> int:
    """How many tensors of `shape` (either orientation) `fn()` allocates, forward and
    backward, counted through the dispatcher: new memory only (views and in-place results
    share an input's storage)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor) and sorted(o.shape) == sorted(shape) and \
                        o.untyped_storage().data_ptr() not in inputs:
                    self.n += 1
            return out

    mode = Count()
    with mode:
        fn()
    return mode.n
