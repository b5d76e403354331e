"""The CPU process group the callbacks talk over: a few numbers at a step boundary, without touching the GPU."""

from __future__ import annotations

import torch.distributed as dist

_made_for: tuple[object, dist.ProcessGroup] | None = None  # (the default group it was made in, the CPU group)


def cpu_group() -> dist.ProcessGroup | None:
    """The world as a gloo group: the default one where it is gloo, else one made once per default group (every rank
    must call this at the same point the first time: ``new_group`` is collective). None without a process group."""
    global _made_for
    if not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if _made_for is None or _made_for[0] is not world:
        _made_for = (world, world if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return _made_for[1]
