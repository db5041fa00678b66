"""Peak bytes of live tensors, counted on any device (the CPU has no allocator statistics).

A ``TorchDispatchMode`` sees every tensor an op returns; each storage is counted once, from the first tensor that
holds it until the last one registered with it is garbage (weakref finalizers), so views and in-place results add
nothing. Tensors that exist before the mode starts (weights, tables) are not counted: the figure is what the code
inside the block allocates and keeps, at its worst moment. What a single op allocates internally and frees before
returning is not seen."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...`` then ``m.peak`` (bytes) and ``m.current``."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._refs: dict[int, list] = {}        # storage address -> [live tensors, bytes]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0:
                continue
            entry = self._refs.get(key)
            if entry is None:
                entry = self._refs[key] = [0, nbytes]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out
