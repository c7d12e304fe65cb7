"""The bare side of the step benchmark: hand-written LoRA/LoCon/LoHa/LoKr deltas and a plain loop.

Each delta is hooked in the way LyCORIS's bypass mode hooks its modules (the
original module's ``forward`` is replaced on the instance), so both sides take
the same call path and differ only in what runs inside it. Shapes, ranks, scale
and initial values are copied from the LyCORIS modules of a Network built for
the same config, so both sides train exactly the same tensors.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.training.losses import DiffusionLoss
from trainer.training.optim import build_optimizer


class BareDelta(nn.Module):
    """org(x) + delta(x) for one target layer; subclasses write delta()."""

    def __init__(self, org: nn.Module, scale: float):
        super().__init__()
        self.is_conv = isinstance(org, nn.Conv2d)
        self.shape = tuple(org.weight.shape)
        self.conv_kw = ({"stride": org.stride, "padding": org.padding, "dilation": org.dilation,
                         "groups": org.groups} if self.is_conv else {})
        self.scale = float(scale)
        self.enabled = True  # False: the layer runs as the frozen model's own
        object.__setattr__(self, "org_forward", org.forward)  # not a submodule: the U-Net owns it
        org.forward = self.forward

    def op(self, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's own op with a delta weight (no bias)."""
        return F.conv2d(x, weight, None, **self.conv_kw) if self.is_conv else F.linear(x, weight)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.org_forward(x)
        return self.org_forward(x) + self.delta(x)

    def delta(self, x: Tensor) -> Tensor:
        raise NotImplementedError


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().float())


class BareLoRA(BareDelta):
    """up(down(x)) * scale; convs: down is k x k with the layer's stride/padding, up is 1 x 1."""

    def __init__(self, org: nn.Module, lyco):
        super().__init__(org, lyco.scale)
        self.down = _param(lyco.lora_down.weight)
        self.up = _param(lyco.lora_up.weight)

    def delta(self, x: Tensor) -> Tensor:
        if self.is_conv:
            return F.conv2d(F.conv2d(x, self.down, None, **self.conv_kw), self.up) * self.scale
        return F.linear(F.linear(x, self.down), self.up) * self.scale


class BareLoHa(BareDelta):
    """op(x, ((w1a @ w1b) * (w2a @ w2b)).reshape(W) * scale): the Hadamard delta weight each forward."""

    def __init__(self, org: nn.Module, lyco):
        super().__init__(org, lyco.scale)
        self.w1a, self.w1b = _param(lyco.hada_w1_a), _param(lyco.hada_w1_b)
        self.w2a, self.w2b = _param(lyco.hada_w2_a), _param(lyco.hada_w2_b)

    def weight(self) -> Tensor:
        return ((self.w1a @ self.w1b) * (self.w2a @ self.w2b)).reshape(self.shape) * self.scale

    def delta(self, x: Tensor) -> Tensor:
        return self.op(x, self.weight())


class _HadamardRecompute(torch.autograd.Function):
    """(w1a @ w1b) * (w2a @ w2b) * scale, keeping only the four factors for the backward, which
    rebuilds both products: the memory-for-time trade LyCORIS makes for LoHa."""

    @staticmethod
    def forward(ctx, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)   # d/d(w1a @ w1b)
        g2 = grad * (w1a @ w1b)   # d/d(w2a @ w2b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


class BareLoHaRecompute(BareLoHa):
    """BareLoHa whose backward rebuilds the two products instead of autograd keeping them."""

    def weight(self) -> Tensor:
        return _HadamardRecompute.apply(self.w1a, self.w1b, self.w2a, self.w2b, self.scale).reshape(self.shape)


class BareLoKr(BareDelta):
    """kron(w1, w2) * scale applied without building it, as LyCORIS's bypass does.

    Input channels split into (uq, vq) groups: w2 (or its low-rank pair, or a k x k
    conv) maps vq -> vp inside each group, then w1 mixes the groups uq -> up.
    Factor shapes are the ones LyCORIS chose (read from its parameters).
    """

    def __init__(self, org: nn.Module, lyco):
        super().__init__(org, lyco.scale)
        if getattr(lyco, "tucker", False) and not lyco.use_w2:
            raise ValueError("tucker LoKr is not part of this benchmark")
        self.parts = nn.ParameterDict({
            k: _param(getattr(lyco, f"lokr_{k}")) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
            if isinstance(getattr(lyco, f"lokr_{k}", None), nn.Parameter)})

    def w1(self) -> Tensor:
        p = self.parts
        return p["w1"] if "w1" in p else p["w1_a"] @ p["w1_b"]

    def inner(self, h: Tensor) -> Tensor:
        """The w2 map inside each group: full, or low-rank (down then up)."""
        p, kernel = self.parts, self.shape[2:]
        if "w2" in p:
            return self.op(h, p["w2"])
        rank = p["w2_b"].shape[0]
        down = p["w2_b"].reshape(rank, -1, *kernel)
        up = p["w2_a"].reshape(*p["w2_a"].shape, *([1] * len(kernel)))
        mid = self.op(h, down)
        return F.conv2d(mid, up) if self.is_conv else F.linear(mid, up)

    def delta(self, x: Tensor) -> Tensor:
        w1 = self.w1()
        uq = w1.shape[1]
        if self.is_conv:
            n = x.shape[0]
            hb = self.inner(x.reshape(n * uq, -1, *x.shape[2:]))     # (n*uq, vp, H, W)
            hb = hb.view(n, uq, *hb.shape[1:]).transpose(1, -1)       # (n, W, vp, H, uq)
            hc = F.linear(hb, w1).transpose(1, -1)                    # (n, up, vp, H, W)
            return hc.reshape(n, -1, *hc.shape[3:]) * self.scale
        hb = self.inner(x.reshape(*x.shape[:-1], uq, -1))             # (..., uq, vp)
        hc = F.linear(hb.transpose(-1, -2), w1).transpose(-1, -2)     # (..., up, vp)
        return hc.reshape(*hc.shape[:-2], -1) * self.scale


class BareLoKrRebuild(BareLoKr):
    """op(x, kron(w1, w2) * scale): the delta weight built each forward (for comparison only)."""

    def weight(self) -> Tensor:
        p = self.parts
        kernel = self.shape[2:]
        if "w2" in p:
            w2 = p["w2"]
        else:
            w2 = (p["w2_a"] @ p["w2_b"].reshape(p["w2_b"].shape[0], -1)).reshape(p["w2_a"].shape[0], -1, *kernel)
        w1 = self.w1()
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1, w2).reshape(self.shape) * self.scale

    def delta(self, x: Tensor) -> Tensor:
        return self.op(x, self.weight())


BARE = {"lierla": BareLoRA, "c3lier": BareLoRA, "loha": BareLoHa, "lokr": BareLoKr}


def attach(unet: nn.Module, algo: str, targets: list[tuple[str, object]], rebuild_lokr: bool = False,
           recompute_loha: bool = False) -> nn.ModuleList:
    """Hook a bare delta into every target of `unet` (path, LyCORIS module)."""
    cls = BARE[algo]
    if algo == "lokr" and rebuild_lokr:
        cls = BareLoKrRebuild
    elif algo == "loha" and recompute_loha:
        cls = BareLoHaRecompute
    deltas = nn.ModuleList()
    for path, lyco in targets:
        deltas.append(cls(unet.get_submodule(path), lyco))
    return deltas


def check_same_math(deltas: nn.ModuleList, targets: list[tuple[str, object]], seed: int = 0) -> float:
    """Largest relative |bare - LyCORIS| delta output over all modules, on random weights and inputs.

    Both sides get the same random weights for the probe, then their own values back.
    """
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for delta, (_, lyco) in zip(deltas, targets):
            pairs = list(zip(delta.parameters(), (p for _, p in _lyco_params(lyco, delta))))
            saved = [p.detach().clone() for p, _ in pairs]
            for p, q in pairs:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                q.data = p.detach().clone().to(q)
            x = torch.randn(_probe_shape(delta), generator=gen)
            mine = delta.delta(x)
            theirs = lyco.bypass_forward_diff(x, scale=lyco.multiplier)
            worst = max(worst, float((mine - theirs).abs().max()) / max(1e-12, float(theirs.abs().max())))
            for (p, q), value in zip(pairs, saved):
                p.copy_(value)
                q.data = value.clone().to(q)
    return worst


def _probe_shape(delta: BareDelta) -> tuple[int, ...]:
    """A small input the layer accepts: 8x8 images for convs, 7 tokens for linears."""
    if delta.is_conv:
        return (1, delta.shape[1] * delta.conv_kw["groups"], 8, 8)
    return (1, 7, delta.shape[1])


def _lyco_params(lyco, delta: BareDelta) -> list[tuple[str, nn.Parameter]]:
    """The LyCORIS parameters matching the delta's, in the same order."""
    if isinstance(delta, BareLoRA):
        names = ["lora_down.weight", "lora_up.weight"]
    elif isinstance(delta, BareLoHa):
        names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    else:
        names = [f"lokr_{k}" for k in delta.parts]
    return [(n, lyco.get_parameter(n)) for n in names]


def _timed_loop(unet: nn.Module, deltas: nn.ModuleList, steps: int, lr: float, seed: int,
                step_loss: Callable[[torch.Generator], Tensor],
                on_step: Callable[[int, float], None] | None = None,
                autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                scaler: torch.amp.GradScaler | None = None) -> tuple[list[float], list[float]]:
    """loss / backward / AdamW step / zero_grad per step; the wall and process-CPU seconds of each.

    The loss is read back each step, as the trainer does for its log: on an accelerator
    that is also what makes each step's time its own.
    """
    opt = build_optimizer("AdamW", [{"params": list(deltas.parameters()), "lr": lr}], lr, "")
    device = next(deltas.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    unet.train()
    wall, cpu = [], []
    for step in range(1, steps + 1):
        tick, tock = time.perf_counter(), time.process_time()
        with autocast():
            loss = step_loss(gen)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        wall.append(time.perf_counter() - tick)
        cpu.append(time.process_time() - tock)
        if on_step is not None:
            on_step(step, value)
    unet.eval()
    return wall, cpu


def bare_loop(unet: nn.Module, deltas: nn.ModuleList, *, steps: int, latents: Tensor, cond: Tensor,
              alphas_cumprod: Tensor, snr_gamma: float, lr: float, seed: int,
              on_step: Callable[[int, float], None] | None = None,
              autocast: Callable[[], ContextManager] = contextlib.nullcontext,
              scaler: torch.amp.GradScaler | None = None) -> tuple[list[float], list[float]]:
    """The LoRA step by hand, with fresh noise and timesteps each step (on the latents' device)."""
    dev = latents.device
    loss_fn = DiffusionLoss("MSE", alphas_cumprod, snr_gamma=snr_gamma, v_pred=False, device=dev)
    sqrt_a = alphas_cumprod.float().sqrt().to(dev)
    sqrt_1ma = (1.0 - alphas_cumprod.float()).sqrt().to(dev)
    dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype  # the frozen weights'

    def step_loss(gen: torch.Generator) -> Tensor:
        noise = torch.randn(latents.shape, generator=gen, device=dev)
        t = torch.randint(0, alphas_cumprod.shape[0], (latents.shape[0],), generator=gen, device=dev)
        noisy = sqrt_a[t].view(-1, 1, 1, 1) * latents + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
        pred = unet(noisy.to(dtype), t, cond.to(dtype), return_dict=False)[0]
        return loss_fn(pred, noise, t)[0]

    return _timed_loop(unet, deltas, steps, lr, seed, step_loss, on_step, autocast, scaler)


def set_enabled(deltas: nn.ModuleList, on: bool) -> None:
    for delta in deltas:
        delta.enabled = on


def bare_ileco_loop(unet: nn.Module, deltas: nn.ModuleList, *, steps: int, shape: tuple[int, ...], cond_orig: Tensor,
                    cond_targ: Tensor, alphas_cumprod: Tensor, snr_gamma: float, lr: float,
                    seed: int) -> tuple[list[float], list[float]]:
    """iLECO's step by hand: random latents, a no-grad base forward with the deltas off, then
    a forward with them on against it."""
    loss_fn = DiffusionLoss("MSE", alphas_cumprod, snr_gamma=snr_gamma, v_pred=False, device=cond_orig.device)

    def step_loss(gen: torch.Generator) -> Tensor:
        z = torch.randn(shape, generator=gen)
        t = torch.randint(0, alphas_cumprod.shape[0], (shape[0],), generator=gen)
        set_enabled(deltas, False)
        with torch.no_grad():
            base = unet(z, t, cond_targ, return_dict=False)[0]
        set_enabled(deltas, True)
        pred = unet(z, t, cond_orig, return_dict=False)[0]
        return loss_fn(pred, base, t)[0]

    return _timed_loop(unet, deltas, steps, lr, seed, step_loss)
