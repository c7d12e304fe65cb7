"""What the Stable Diffusion U-Net families (SD1, SD2, SDXL) share: DDPM noising, epsilon or v
targets, the TrainTrain block IDs of the ldm U-Net, CLIP prompt encoding and diffusers' SD pipelines."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import torch

from . import blocks
from .base import Family

TRANSFORMER_TARGETS = ("Transformer2DModel",)
CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .textenc import Cond


class UNetFamily(Family):
    """A Stable Diffusion U-Net family; subclasses set the sizes and the text side."""

    unet_levels: ClassVar[int] = 4

    def sample_timesteps(self, cfg: Any, batch: int, latent_shape: tuple[int, ...], *,
                         generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Integer DDPM timesteps in [train_min_timesteps, train_max_timesteps)."""
        from ..training.losses import sample_timesteps

        return sample_timesteps(batch, cfg.train_min_timesteps, cfg.train_max_timesteps,
                                same_in_batch=cfg.train_fixed_timsteps_in_batch, generator=generator,
                                device=device)

    def make_loss(self, cfg: Any, scheduler: Any, *, v_pred: bool, device: torch.device) -> Any:
        """Kind, Huber schedule, min-SNR and debiased weights over the DDPM schedule."""
        from ..training.losses import DiffusionLoss

        return DiffusionLoss(cfg.train_loss_function, scheduler.alphas_cumprod, snr_gamma=cfg.train_snr_gamma,
                             v_pred=v_pred, device=device, debiased=cfg.train_debiased_estimation,
                             c=cfg.huber_c, schedule=cfg.huber_schedule)

    def denoise(self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond,
                time_ids: torch.Tensor | None, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        hidden = cond.hidden.to(device, dtype)
        kwargs = self.model_kwargs(cond, time_ids, device, dtype)
        return bundle.unet(noisy.to(dtype), timesteps, hidden, return_dict=False, **kwargs)[0]

    def model_kwargs(self, cond: Cond, time_ids: torch.Tensor | None, device: torch.device,
                     dtype: torch.dtype) -> dict[str, Any]:
        """Extra keyword arguments of one U-Net forward (SDXL's added conditioning)."""
        return {}

    def latent_channels(self, bundle: ModelBundle) -> int:
        return int(bundle.unet.config.in_channels)

    def latent_multiple(self, bundle: ModelBundle) -> int:
        return bundle.vae_factor * 2 ** (len(bundle.unet.config.block_out_channels) - 1)

    def native_size(self, bundle: ModelBundle) -> int:
        return int(bundle.unet.config.sample_size) * bundle.vae_factor

    def network_targets(self, trains_convs: bool) -> list[str]:
        return list(TRANSFORMER_TARGETS + (CONV_TARGETS if trains_convs else ()))

    def file_names(self, bundle: ModelBundle, lora_names: list[str]) -> dict[str, str]:
        if not self.ldm_unet_keys:
            return {}
        from .ldm_names import kohya_unet_renames

        return kohya_unet_renames(bundle.unet, lora_names)

    def noisy_input(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
        return scheduler.add_noise(latents, noise, timesteps)

    def target(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               v_pred: bool) -> torch.Tensor:
        from ..training.losses import training_target

        return training_target(scheduler, latents, noise, timesteps, v_pred)

    def block_ids(self) -> tuple[str, ...]:
        return blocks.family_block_ids(self.unet_levels)

    def block_id(self, module_name: str) -> str | None:
        return blocks.block_id(self.unet_levels, module_name)

    def selector(self, wanted: Iterable[str], element: str, scope: Mapping[str, Any] | None = None) -> Callable[[str], bool]:
        return blocks.unet_selector(self.unet_levels, wanted, element)

    def encode_prompts(self, bundle: ModelBundle, prompts: list[str], *, clip_skip: int,
                       grad: bool) -> Cond:
        from .textenc import encode_single

        return encode_single(bundle, prompts, clip_skip=clip_skip if self.applies_clip_skip else 1)

    def sampling_scheduler(self, noise_scheduler: Any, sampler: str) -> Any:
        """DDIM or Euler from the training schedule's config, so the betas and the prediction type
        (v-prediction) are the ones the network is trained against."""
        from diffusers import DDIMScheduler, EulerDiscreteScheduler

        # SD's own inference settings; steps_offset=1 also keeps the pipelines from rewriting the config
        if sampler == "ddim":
            return DDIMScheduler.from_config(noise_scheduler.config, steps_offset=1, clip_sample=False,
                                             set_alpha_to_one=False)
        return EulerDiscreteScheduler.from_config(noise_scheduler.config, steps_offset=1)

    def pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                       tokenizer=bundle.tokenizers[0], unet=bundle.unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
