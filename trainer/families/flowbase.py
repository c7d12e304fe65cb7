"""What the flow-matching families (FLUX.1, SD3, Z-Image) share: their settings check, the σ draw,
the noisy input (1 − σ)·x0 + σ·noise, the velocity target noise − x0 and the loss.

A family overrides what it does otherwise (SD3: its σ draw, its x0 target and the density settings
it reads; see sd3.py).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch

from ..config.params import ConfigError
from . import flow
from .base import Family


def flow_options(cfg: Any) -> flow.FlowOptions:
    """The job's flow-matching settings; a bad value names its preset key."""
    try:
        return flow.FlowOptions(timestep_sampling=cfg.timestep_sampling, sigmoid_scale=cfg.sigmoid_scale,
                                discrete_flow_shift=cfg.discrete_flow_shift, weighting_scheme=cfg.weighting_scheme,
                                logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                model_prediction_type=cfg.model_prediction_type)
    except ValueError as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(key, getattr(cfg, key, None), str(exc).split(":", 1)[-1].strip()) from None


class FlowLoss:
    """The flow-matching loss: elementwise loss per sample (Huber at a constant c), times the
    weighting sigma_scaled asks for; called as loss(pred, target, sigma, mask)."""

    def __init__(self, kind: str, c: float, opts: flow.FlowOptions) -> None:
        from ..training.losses import HUBER_KINDS, check_kind

        self.kind, self.opts = check_kind(kind), opts
        self.c = float(c) if self.kind in HUBER_KINDS else None

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from ..training.losses import per_sample_loss

        per_c = None if self.c is None else torch.full((pred.shape[0],), self.c, device=pred.device)
        per_sample = per_sample_loss(pred, target, self.kind, mask, per_c)
        if self.opts.model_prediction_type == "sigma_scaled":
            per_sample = per_sample * flow.loss_weighting(self.opts.weighting_scheme, timesteps).to(per_sample.device)
        return per_sample.mean(), per_sample.detach()


class FlowFamily(Family):
    """A Family trained by flow matching."""

    see_also = "timestep_sampling and weighting_scheme"  # where a refused DDPM setting's message points

    def flow_options(self, cfg: Any) -> flow.FlowOptions:
        """The flow settings this family reads (FLUX.1's whole set unless it says otherwise)."""
        return flow_options(cfg)

    def check_flow(self, cfg: Any) -> list[str]:
        """DDPM-only settings: explicit ones are refused; min-SNR (on in TrainTrain's defaults) is left
        out with a message, which is returned."""
        from ..training.losses import HUBER_KINDS

        flow_schedule = f"applies to DDPM-schedule models; {self.label} trains with a flow schedule"
        for key in ("train_debiased_estimation", "zero_terminal_snr", "model_v_pred"):
            if getattr(cfg, key):
                raise ConfigError(key, getattr(cfg, key), f"{flow_schedule} (see {self.see_also})")
        if cfg.train_loss_function in HUBER_KINDS and cfg.huber_schedule != "constant":
            raise ConfigError("huber_schedule", cfg.huber_schedule,
                              f"{self.label} takes a constant Huber c (huber_schedule constant)")
        self.flow_options(cfg)
        if cfg.train_snr_gamma > 0:
            return [f"train_snr_gamma {cfg.train_snr_gamma:g} {flow_schedule}; this job trains without it "
                    "(weighting_scheme sets the flow weighting)"]
        return []

    def check(self, cfg: Any) -> list[str]:
        return self.check_flow(cfg)

    def sample_timesteps(self, cfg: Any, batch: int, latent_shape: tuple[int, ...], *,
                         generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """σ per sample, for 2×2-patch image tokens (flux_shift scales with their count)."""
        tokens = flow.flux_image_tokens(int(latent_shape[-2]), int(latent_shape[-1]))
        return flow.sample_sigmas(self.flow_options(cfg), batch, image_tokens=tokens, generator=generator,
                                  device=device)

    def noisy_input(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
        return flow.noisy_input(latents, noise, timesteps)

    def target(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               v_pred: bool) -> torch.Tensor:
        return flow.flow_target(latents, noise)

    def make_loss(self, cfg: Any, scheduler: Any, *, v_pred: bool, device: torch.device) -> FlowLoss:
        return FlowLoss(cfg.train_loss_function, cfg.huber_c, self.flow_options(cfg))


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (its buffers too: a stand-in encoder may hold no parameter)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


def t5_states(t5: torch.nn.Module, tokenizer: Any, prompts: list[str], length: int, masked: bool) -> torch.Tensor:
    """T5's last hidden states for `prompts` padded to `length` tokens; `masked` masks the padding in
    attention and zeroes its states (sd-scripts' apply_t5_attn_mask)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = device_of(t5)
    mask = tokens.attention_mask.to(device)
    hidden = t5(tokens.input_ids.to(device), attention_mask=mask if masked else None)[0]
    return hidden * mask.unsqueeze(-1).to(hidden.dtype) if masked else hidden
