"""Block swap on a tiny FluxTransformer2DModel, across a fake device boundary on the CPU.

The fake mover labels each block "gpu" or "cpu". A block sent to "cpu" has its weights
replaced by NaN (the real values kept aside), so a block that computed while offloaded
would poison the loss and the gradients, which are compared exactly with a run without swap.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import FluxTransformer2DModel
from lycoris.kohya import LycorisNetworkKohya
from torch.utils.checkpoint import set_checkpoint_early_stop

from trainer.config.params import ConfigError
from trainer.training.blockswap import enable_block_swap, flux_blocks, move_except

from tests.flux_tiny import flux_lycoris

DOUBLE, SINGLE = 3, 3
L = DOUBLE + SINGLE


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4))
    model.requires_grad_(False)
    return model.train()


def inputs(seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 9, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 4, 12, generator=g),
            "pooled_projections": torch.randn(2, 10, generator=g), "timestep": torch.tensor([0.3, 0.8]),
            "guidance": torch.tensor([1.0, 3.5]), "img_ids": torch.rand(9, 3, generator=g) * 3,
            "txt_ids": torch.zeros(4, 3), "return_dict": False}


def lycoris(model: torch.nn.Module, dora: bool = False) -> LycorisNetworkKohya:
    """A LyCORIS LoRA on both FLUX block classes, applied, with random weights."""
    return flux_lycoris(model, rank=2, alpha=1.0, dora=dora, bypass=not dora)


class FakeBoundary:
    """A mover across a pretend device boundary: labels, a move log, NaN while offloaded."""

    def __init__(self, blocks: list[torch.nn.Module], keep: int):
        self.index = {id(b): i for i, b in enumerate(blocks)}
        self.blocks, self.keep = blocks, keep
        self.label = {i: "cpu" for i in range(len(blocks))}  # the loader leaves the model on the CPU
        self.moves: list[tuple[int, str]] = []
        self.stash: dict[int, torch.Tensor] = {}

    def __call__(self, module: torch.nn.Module, device: str) -> None:
        i = self.index[id(module)]
        assert device in ("gpu", "cpu")
        self.moves.append((i, device))
        if device == "cpu" and self.label[i] == "gpu":
            for p in module.parameters():
                self.stash[id(p)], p.data = p.data, torch.full_like(p.data, math.nan)
        elif device == "gpu" and self.label[i] == "cpu":
            for p in module.parameters():
                if id(p) in self.stash:
                    p.data = self.stash.pop(id(p))
        self.label[i] = device
        assert self.on_gpu() <= self.keep, f"{self.on_gpu()} blocks on the device after {self.moves}"

    def on_gpu(self) -> int:
        return sum(v == "gpu" for v in self.label.values())

    def watch(self, computed: list[tuple[str, int]]) -> None:
        """Assert, whenever a block computes (forward, recomputation, backward), that it is on "gpu"."""
        def pre(i):
            def hook(module, args):
                assert self.label[i] == "gpu", f"block {i} computes on {self.label[i]}"
                computed.append(("backward-recompute" if torch._C._current_graph_task_id() != -1 else "forward", i))
            return hook

        def post(i):
            def hook(module, args, out):
                for t in out if isinstance(out, tuple) else (out,):
                    if t.requires_grad:
                        t.register_hook(lambda grad, i=i: self._backward_check(i, computed))
            return hook

        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(pre(i))
            block.register_forward_hook(post(i))

    def _backward_check(self, i: int, computed: list) -> None:
        assert self.label[i] == "gpu", f"block {i}'s backward starts on {self.label[i]}"
        assert self.on_gpu() <= self.keep
        computed.append(("backward", i))


def train_step(model, trainable) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in trainable:
        p.grad = None
    out = model(**inputs())[0]
    loss = (out.float() - 0.5).pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainable]


def outside_params(model) -> list[torch.nn.Parameter]:
    """Embedders and output layers trained, so every block's backward runs through its base weights."""
    mods = (model.x_embedder, model.context_embedder, model.proj_out)
    params = [p for m in mods for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def swapped_step(model, trainable, n):
    blocks = flux_blocks(model)
    fake = FakeBoundary(blocks, L - n)
    swap = enable_block_swap(blocks, n, device="gpu", offload="cpu", mover=fake)
    computed: list = []
    fake.watch(computed)
    swap.prepare()
    fake.moves.clear()
    swap.prepare()
    loss, grads = train_step(model, trainable)
    return swap, fake, computed, loss, grads


def backward_order(computed: list) -> list[int]:
    """Blocks in the order their backward started (a double block reports each of its two outputs)."""
    return list(dict.fromkeys(i for kind, i in computed if kind == "backward"))


# Hand-derived schedules (block, destination) for one step: prepare, forward, backward.
EXPECTED = {
    2: [(0, "cpu"), (4, "gpu"), (1, "cpu"), (5, "gpu"),  # forward: after block i, i out, i+4 in
        (5, "cpu"), (1, "gpu"), (4, "cpu"), (0, "gpu")],  # backward: before 4 runs, 5 out, 1 in…
    4: [(0, "cpu"), (2, "gpu"), (1, "cpu"), (3, "gpu"), (2, "cpu"), (4, "gpu"), (3, "cpu"), (5, "gpu"),
        (5, "cpu"), (3, "gpu"), (4, "cpu"), (2, "gpu"), (3, "cpu"), (1, "gpu"), (2, "cpu"), (0, "gpu")],
}


@pytest.mark.parametrize("checkpointing", ["off", "on", "full recompute"])
@pytest.mark.parametrize("n", [2, 4])
def test_step_equals_unswapped_step_and_follows_the_schedule(n, checkpointing):
    """'full recompute' turns off checkpointing's early stop, so the recomputed forward
    reaches the blocks' forward hooks inside the backward."""
    model = tiny_flux()
    if checkpointing != "off":
        model.enable_gradient_checkpointing()
    trainable = outside_params(model)
    with set_checkpoint_early_stop(checkpointing != "full recompute"):
        ref_loss, ref_grads = train_step(model, trainable)
        swap, fake, computed, loss, grads = swapped_step(model, trainable, n)
    assert fake.moves == EXPECTED[n]
    assert torch.isfinite(loss) and torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert [c for c in computed if c[0] == "forward"] == [("forward", i) for i in range(L)]
    assert backward_order(computed) == list(reversed(range(L)))
    recomputed = [c[1] for c in computed if c[0] == "backward-recompute"]
    assert recomputed == ([] if checkpointing == "off" else list(reversed(range(L))))
    # the next step starts from the state the backward left: prepare moves nothing
    fake.moves.clear()
    swap.prepare()
    assert fake.moves == []
    with set_checkpoint_early_stop(checkpointing != "full recompute"):
        assert train_step(model, trainable)[0].equal(ref_loss) and fake.moves == EXPECTED[n]


@pytest.mark.parametrize("dora", [False, True])
def test_lycoris_network_trains_identically_and_stays_on_the_device(dora):
    model = tiny_flux()
    model.enable_gradient_checkpointing()
    net = lycoris(model, dora=dora)
    trainable = list(net.parameters())
    assert trainable and not {id(p) for p in trainable} & {id(p) for b in flux_blocks(model) for p in b.parameters()}
    data = [p.data_ptr() for p in trainable]
    ref_loss, ref_grads = train_step(model, trainable)
    swap, fake, computed, loss, grads = swapped_step(model, trainable, 3)
    assert torch.isfinite(loss) and torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(grads, ref_grads))
    assert [p.data_ptr() for p in trainable] == data  # never moved
    assert backward_order(computed) == list(reversed(range(L)))


def test_forward_without_prepare_still_computes_on_the_device():
    """A sampling forward (no grad) leaves the last blocks resident; a forward without
    prepare() then loads each block on demand, never over the limit, with the same result."""
    model = tiny_flux().eval()
    with torch.no_grad():
        ref = model(**inputs())[0]
    blocks = flux_blocks(model)
    fake = FakeBoundary(blocks, L - 3)
    swap = enable_block_swap(blocks, 3, device="gpu", offload="cpu", mover=fake)
    fake.watch([])
    swap.prepare()
    with torch.no_grad():
        first = model(**inputs())[0]
        assert {i for i, v in fake.label.items() if v == "gpu"} == {3, 4, 5}
        second = model(**inputs())[0]  # no prepare() in between
    assert torch.equal(first, ref) and torch.equal(second, ref)
    fake.keep = L  # remove() brings every block back
    swap.remove()
    assert all(v == "gpu" for v in fake.label.values())
    fake.moves.clear()
    with torch.no_grad():
        assert torch.equal(model(**inputs())[0], ref)
    assert fake.moves == []  # unhooked


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_after_a_sampling_forward_without_prepare(checkpointing):
    """The schedule is broken (the last blocks are resident when the forward starts); blocks
    then load on demand in the forward and the backward, within the limit, with exact grads."""
    model = tiny_flux()
    if checkpointing:
        model.enable_gradient_checkpointing()
    trainable = outside_params(model)
    ref_loss, ref_grads = train_step(model, trainable)
    blocks = flux_blocks(model)
    fake = FakeBoundary(blocks, L - 3)
    swap = enable_block_swap(blocks, 3, device="gpu", offload="cpu", mover=fake)
    computed: list = []
    fake.watch(computed)
    swap.prepare()
    with torch.no_grad():
        model(**inputs())
    for _ in range(2):  # no prepare() before either step
        loss, grads = train_step(model, trainable)
        assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert backward_order(computed) == list(reversed(range(L)))


def test_zero_blocks_to_swap_moves_nothing():
    model = tiny_flux()
    fake = FakeBoundary(flux_blocks(model), L)
    swap = enable_block_swap(flux_blocks(model), 0, device="gpu", offload="cpu", mover=fake)
    swap.prepare()
    train_step(model, outside_params(model))
    swap.remove()
    assert fake.moves == []


@pytest.mark.parametrize("n", [-1, L - 1, L, 2.0, True, "2"])
def test_bad_blocks_to_swap_is_refused_naming_the_key(n):
    model = tiny_flux()
    with pytest.raises(ConfigError) as err:
        enable_block_swap(flux_blocks(model), n, device="gpu", offload="cpu", mover=lambda m, d: None)
    assert "blocks_to_swap" in str(err.value) and repr(n) in str(err.value)
    if isinstance(n, int) and not isinstance(n, bool):
        assert f"{L} blocks" in str(err.value) and f"at most {L - 2}" in str(err.value)


def test_default_mover_moves_blocks_and_move_except_moves_the_rest():
    """The real mover on real devices: 'meta' stands for the compute device (no data needed)."""
    model = tiny_flux()
    blocks = flux_blocks(model)
    move_except(model, blocks, "meta")
    assert model.x_embedder.weight.device.type == "meta" and model.proj_out.weight.device.type == "meta"
    assert all(p.device.type == "cpu" for b in blocks for p in b.parameters())
    swap = enable_block_swap(blocks, 2, device="meta", offload="cpu")
    swap.prepare()
    where = [{p.device.type for p in b.parameters()} for b in blocks]
    assert where == [{"meta"}] * (L - 2) + [{"cpu"}] * 2
