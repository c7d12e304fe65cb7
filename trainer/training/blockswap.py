"""Block swap (``blocks_to_swap``): keep only part of a transformer's blocks on the compute device.

The blocks (FLUX: the double blocks, then the single blocks) run in order in the forward and
in reverse order in the backward. With ``n`` blocks to swap, at most ``len(blocks) - n`` of
them hold their weights on the compute device at any moment; the others wait on the offload
device (the CPU). The window of resident blocks slides with the computation:

* ``prepare()`` (before every forward) places blocks ``0 .. L-n-1`` on the device and the
  last ``n`` on the offload device.
* forward, after block ``i`` (``i < n``) has run: block ``i`` goes out, block ``i + L - n``
  comes in. After the forward the last ``L - n`` blocks are resident, the first ones the
  backward needs.
* backward, when the gradient of block ``j``'s output is ready (so block ``j + 1`` has
  finished its backward): block ``j + 1`` goes out and block ``j + 1 - (L - n)`` comes in,
  when ``j + 1 >= L - n``. After the backward the first ``L - n`` blocks are resident again.

Every move is a pair (one out, then one in), so the resident count never exceeds
``L - n``. Weights saved for the backward are the blocks' Parameter objects; moving a block
replaces their ``.data`` in place, so the autograd graph sees them wherever they are when the
backward reaches them. Before any block computes (forward, or a gradient checkpointing
recomputation inside the backward) a pre-hook makes sure it is resident, loading it in
exchange for another block if the schedule was broken (a forward without ``prepare()``), so
the result never depends on the schedule, only the number of moves does.

Moves run on the compute device's current stream (``non_blocking`` copies), so they are
ordered with the kernels around them without a host wait; ``prepare()`` and ``remove()``
synchronise once. They do not overlap with compute (a copy stream would): a simpler scheme
traded for no cross-stream bookkeeping.

The backward signal relies on the blocks being a chain: block ``j + 1`` reads block ``j``'s
outputs, and the inputs all blocks share (FLUX's time embedding and rotary embedding) need
no gradient through the base weights. That holds while the text encoders are frozen; the
integrator refuses block swap together with text-encoder training.

LyCORIS networks are not submodules of the blocks (they hold the wrapped Linear in a plain
list and replace its ``forward``), so their parameters stay on the compute device with the
optimizer's state; only the frozen base weights travel.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..config.params import ConfigError

Mover = Callable[[nn.Module, "torch.device | str"], None]


def default_mover(module: nn.Module, device: torch.device | str) -> None:
    """Move a block's parameters and buffers, without a host wait (stream-ordered)."""
    module.to(device, non_blocking=True)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued copies (nothing to wait for on the CPU, "meta" or a test's labels)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return  # a label of a test's fake device boundary
    accel = getattr(torch, "accelerator", None)
    current = accel.current_accelerator() if accel is not None and accel.is_available() else None
    if current is not None and current.type == dev.type:
        accel.synchronize(dev)
    else:  # PyTorch before torch.accelerator: the backend module of that name (torch.xpu, …)
        backend = getattr(torch, dev.type, None)
        if backend is not None and hasattr(backend, "synchronize") and backend.is_available():
            backend.synchronize()


def check_blocks_to_swap(n: object, count: int) -> int:
    """``n`` as an int in 0..count-2, else a ConfigError naming ``blocks_to_swap``."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigError("blocks_to_swap", n, "expected a whole number")
    if not 0 <= n <= count - 2:
        raise ConfigError("blocks_to_swap", n,
                          f"this model has {count} blocks; at most {max(count - 2, 0)} can be swapped "
                          f"(two stay on the device)")
    return n


def _outputs(out: object) -> list[torch.Tensor]:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def _in_backward() -> bool:
    """True while autograd runs a backward (gradient checkpointing recomputes forwards there).

    The same private query torch.utils.checkpoint makes (PyTorch 2.0 and newer).
    """
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """The hooks and residency state of one swapped block list; see the module docstring."""

    def __init__(self, blocks: Sequence[nn.Module], n: int, device, offload, mover: Mover | None):
        self.blocks = list(blocks)
        self.n = n
        self.device, self.offload = device, offload
        self.mover = mover or default_mover
        self.keep = len(self.blocks) - n
        self.resident: set[int] = set(range(len(self.blocks)))  # blocks start where the caller put them
        self._placed = False
        self._seen_backward: set[int] = set()
        self._handles: list = []
        if n:
            for i, block in enumerate(self.blocks):
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(i)))
                self._handles.append(block.register_forward_hook(self._post_hook(i)))

    # ---- moves -----------------------------------------------------------------
    def _out(self, i: int) -> None:
        if i in self.resident:
            self.mover(self.blocks[i], self.offload)
            self.resident.discard(i)

    def _in(self, i: int) -> None:
        if i not in self.resident:
            self.mover(self.blocks[i], self.device)
            self.resident.add(i)

    def _swap(self, out: int, into: int) -> None:
        """The schedule's pair move; the load waits for demand if the window is full."""
        self._out(out)
        if len(self.resident) < self.keep:
            self._in(into)

    def _ensure(self, i: int, backward: bool) -> None:
        """Load block i, first sending out the resident block needed last from here on."""
        if i in self.resident:
            return
        if len(self.resident) >= self.keep:
            # a block already passed in this direction goes first; else the one needed last
            if backward:
                done = [r for r in self.resident if r > i]
                victim = max(done) if done else min(self.resident)
            else:
                done = [r for r in self.resident if r < i]
                victim = min(done) if done else max(self.resident)
            self._out(victim)
        self._in(i)

    # ---- hooks -----------------------------------------------------------------
    def _pre_hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._ensure(i, backward=_in_backward())
        return hook

    def _post_hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            if _in_backward():
                return  # a checkpointing recomputation: the backward schedule owns the moves
            if i == 0:
                self._seen_backward.clear()  # a new forward: its backward comes next
            if i < self.n:
                self._swap(i, i + self.keep)
            if torch.is_grad_enabled():
                for t in _outputs(out):
                    t.register_hook(self._grad_hook(i))
        return hook

    def _grad_hook(self, j: int) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            if j not in self._seen_backward:  # a double block has two outputs: move once
                self._seen_backward.add(j)
                nxt = j + 1
                if self.keep <= nxt < len(self.blocks):
                    self._swap(nxt, nxt - self.keep)
            self._ensure(j, backward=True)
        return hook

    # ---- public ----------------------------------------------------------------
    def prepare(self) -> None:
        """Before each forward: blocks 0..L-n-1 on the device, the last n offloaded."""
        self._seen_backward.clear()
        if not self.n:
            return
        want = set(range(self.keep))
        if not self._placed:  # the first call: the blocks are wherever the caller left them
            for i in range(self.keep, len(self.blocks)):  # out first: the device never holds more
                self.mover(self.blocks[i], self.offload)
            for i in range(self.keep):
                self.mover(self.blocks[i], self.device)
            self.resident, self._placed = want, True
        for i in sorted(self.resident - want):
            self._out(i)
        for i in sorted(want - self.resident):
            self._in(i)
        synchronize(self.device)

    def remove(self) -> None:
        """Unhook and bring every block back to the compute device."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.n:
            for i in range(len(self.blocks)):
                self._in(i)
            synchronize(self.device)

    @property
    def resident_count(self) -> int:
        return len(self.resident)


def enable_block_swap(blocks: Sequence[nn.Module], n: int, *, device, offload="cpu",
                      mover: Mover | None = None) -> BlockSwap:
    """Hook block swap into ``blocks`` (in compute order). Call ``prepare()`` before each forward."""
    check_blocks_to_swap(n, len(blocks))
    return BlockSwap(blocks, n, device, offload, mover)


def flux_blocks(model: nn.Module) -> list[nn.Module]:
    """A FluxTransformer2DModel's blocks in compute order: the double ones, then the single ones."""
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def move_except(model: nn.Module, blocks: Sequence[nn.Module], device) -> None:
    """``model.to(device)`` for everything but ``blocks`` (the embedders, norms, output layers).

    Moving the whole model first would put every block on the device at once. The blocks
    are unlinked from their parents for the move (``Module.to`` skips empty slots).
    """
    ids = {id(b) for b in blocks}
    slots = [(parent, name, child) for parent in model.modules()
             for name, child in parent._modules.items() if id(child) in ids]
    for parent, name, _ in slots:
        parent._modules[name] = None
    try:
        model.to(device, non_blocking=True)
    finally:
        for parent, name, child in slots:
            parent._modules[name] = child
    synchronize(device)
