"""Helpers for the mode tests: a prompt-sensitive tiny model, image pairs, held-out metrics."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.families.bundle import ModelBundle
from trainer.networks.network import Network

from tests.enginekit import quick_config
from tests.tiny import tiny_bundle


def responsive_bundle(family: str = "sd1", seed: int = 0) -> ModelBundle:
    """A tiny model that responds to its prompt and its image the way a trained one does.

    In a random U-Net the prompt moves the output by about 1%, tangled with the
    latent, and no LoRA can learn that in a few dozen steps. Here cross-attention
    averages the prompt tokens (its queries are zero) and the text encoder's output
    is ten times larger, so the prompt shifts every prediction strongly and
    smoothly. And the VAE's scaling factor is set the way Stable Diffusion's was
    chosen, to give latents of unit variance (the random VAE's default gives 0.05,
    which noise drowns at every timestep).
    """
    bundle = tiny_bundle(family, seed=seed)
    with torch.no_grad():
        x = torch.from_numpy(pattern()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        std = float(bundle.vae.encode(x).latent_dist.mean.std())
        bundle.vae.register_to_config(scaling_factor=1.0 / std)
        for name, module in bundle.unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.zero_()
        for te in bundle.text_encoders:
            norm = getattr(te, "text_model", te).final_layer_norm
            norm.weight.mul_(10.0)
            norm.bias.mul_(10.0)
    return bundle


def pattern(size: tuple[int, int] = (64, 64), shift: int = 0, patch: bool = False) -> np.ndarray:
    """A structured RGB image (width, height); `patch` paints a dark square in the middle."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = (xx * (255 // max(1, w - 1)) + shift) % 256
    img[..., 1] = (yy * (255 // max(1, h - 1))) % 256
    img[..., 2] = np.where(((xx // 16 + yy // 16) % 2) == 0, 230, 20)
    if patch:
        img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = (10, 200, 10)
    return img


def write_pair(folder: Path, stem: str = "pair", size: tuple[int, int] = (64, 64),
               target_suffix: str = "_target") -> tuple[Path, Path]:
    """An original and a target image that differ only in a central square."""
    folder.mkdir(parents=True, exist_ok=True)
    orig, targ = folder / f"{stem}.png", folder / f"{stem}{target_suffix}.png"
    Image.fromarray(pattern(size)).save(orig)
    Image.fromarray(pattern(size, patch=True)).save(targ)
    return orig, targ


@contextlib.contextmanager
def loaded(bundle: ModelBundle, cfg, *paths: Path, multipliers: tuple[float, ...] = ()):
    """Networks built from `cfg` and loaded from `paths` into `bundle`, removed afterwards."""
    nets = []
    try:
        for i, path in enumerate(paths):
            net = Network.build(bundle, cfg)
            net.load_weights(path)
            if i < len(multipliers):
                net.set_multiplier(multipliers[i])
            nets.append(net)
        yield nets
    finally:
        for net in reversed(nets):
            net.remove()


def held_out(shape: tuple[int, ...], seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed latents/noise and timesteps spread over the schedule, never seen in training."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen)
    return z, torch.linspace(0, 999, shape[0]).round().long()


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def live_metric_at_save(monkeypatch, metric) -> list[float]:
    """metric(network) computed on the live, in-memory network each time one is saved."""
    seen: list[float] = []
    save = Network.save

    def spy(self, path, **kw):
        with torch.no_grad():
            seen.append(metric(self))
        return save(self, path, **kw)

    monkeypatch.setattr(Network, "save", spy)
    return seen


def mode_job(tmp_path, mode: str, **over):
    """A quick_config for `mode`: rank 4, constant LR, batch 2."""
    base = dict(mode=mode, save_lora_name=mode.lower(), train_lr_scheduler="constant", network_rank=4,
                network_alpha=4.0, train_batch_size=2)
    base.update(over)
    return quick_config(tmp_path, **base)


def record_unet_calls(bundle) -> list[tuple[bool, float]]:
    """(grad enabled, network multiplier as hooked: 0.0 when unhooked) for every U-Net forward."""
    probe = next(m for n, m in bundle.unet.named_modules() if n.endswith("attn2.to_k"))
    calls: list[tuple[bool, float]] = []

    def pre_hook(module, args, kwargs):
        hooked = probe.__dict__.get("forward")
        lyco = getattr(hooked, "__self__", None)
        calls.append((torch.is_grad_enabled(), float(lyco.multiplier) if lyco is not None and lyco is not probe else 0.0))

    bundle.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return calls
