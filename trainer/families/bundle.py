"""ModelBundle: everything a training job needs from one Stable Diffusion model."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .base import Family


@dataclass
class ModelBundle:
    """Denoiser (``unet``), text encoder(s), tokenizer(s), VAE and noise schedule of one model.

    `family` is the family object every caller asks (a name is accepted and looked up).
    text_encoders holds as many encoders as the family has (SDXL: CLIP-L, then OpenCLIP-G with
    projection); tokenizers match them one to one.
    """

    family: Family
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    v_pred: bool = False
    name: str = ""
    source: str = ""
    clip_skip: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from . import get_family  # the registry imports this module's users

        self.family = get_family(self.family)
        expected = self.family.text_encoder_count
        if len(self.text_encoders) != expected or len(self.tokenizers) != expected:
            raise ValueError(f"{self.family} needs {expected} text encoder(s) and tokenizer(s)")

    @property
    def ldm_unet_keys(self) -> bool:
        """Whether LoRA files name this U-Net's modules in the original-model layout."""
        return self.family.ldm_unet_keys

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        """Pixel sizes must be multiples of this for the denoiser to accept them."""
        return self.family.latent_multiple(self)

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]

    def training_scheduler(self, zero_terminal_snr: bool = False) -> Any:
        """The noise schedule to train with: the bundle's own, or a zero-terminal-SNR copy
        (the bundle's scheduler, shared with sampling and the host, is never changed)."""
        if not zero_terminal_snr:
            return self.noise_scheduler
        return zero_terminal_snr_copy(self.noise_scheduler)


def zero_terminal_snr_copy(scheduler: Any) -> Any:
    """A copy of a DDPM-style scheduler whose betas are rescaled so that ᾱ at the last timestep is 0
    ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1), the first ᾱ kept."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    rescaled = copy.deepcopy(scheduler)
    betas = rescale_zero_terminal_snr(scheduler.betas.to(torch.float32).cpu())
    rescaled.betas = betas
    rescaled.alphas = 1.0 - betas
    rescaled.alphas_cumprod = torch.cumprod(rescaled.alphas, dim=0)
    return rescaled
