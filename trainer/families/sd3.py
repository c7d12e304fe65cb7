"""SD3 and SD3.5 (medium and large): a flow-matching MMDiT (diffusers' SD3Transformer2DModel) with
CLIP-L and CLIP-G (penultimate hidden states and projected pooled outputs) and an optional T5-XXL,
and a 16-channel autoencoder (shift 0.0609, scale 1.5305).

The objective is sd-scripts' (sd3_train_network.py): σ drawn from the weighting scheme's density,
shifted by training_shift and quantized to t = floor(σ·1000); noisy = (1 − σ)·x0 + σ·noise; the
transformer takes t; its prediction·(−σ) + noisy is compared with x0, weighted per sample by
sigma_sqrt / cosmap where chosen. LoRA files use sd-scripts' SAI key layout (`sd3_keys.py`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from ..config.params import ConfigError
from . import flow
from .flowbase import FlowFamily, device_of, t5_states
from .sd3_net import SD3NetworkHooks

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .textenc import Cond

DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.add_q_proj.weight", "context_embedder.weight", "pos_embed.proj.weight")
FLUX_MARKERS = ("single_transformer_blocks.0.attn.to_q.weight", "double_blocks.0.img_attn.qkv.weight")
CLIP_LENGTH = 77
FLUX_ONLY = ("blocks_to_swap", "fp8_base")


def sd3_flow_options(cfg: Any) -> flow.FlowOptions:
    """The density settings SD3 uses (model_prediction_type stays sd-scripts' x0 form)."""
    try:
        return flow.FlowOptions(weighting_scheme=cfg.weighting_scheme, logit_mean=cfg.logit_mean,
                                logit_std=cfg.logit_std, mode_scale=cfg.mode_scale)
    except ValueError as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(key, getattr(cfg, key, None), str(exc).split(":", 1)[-1].strip()) from None


class SD3(SD3NetworkHooks, FlowFamily):
    name = "sd3"
    label = "SD3.5"
    text_encoder_count = 3
    pad_tokens = ("<|endoftext|>", "!", "<pad>")
    vae_scale = 1.5305
    model_version = "medium"
    modelspec_arch = "stable-diffusion-3-medium"
    implementation = "diffusers"  # sd-scripts' sai_model_spec for SD3 LoRAs
    host_weights = False  # the WebUIs hold no trainable SD3: it is read from its files

    @classmethod
    def claims(cls, keys: Iterable[str], state_dict: Mapping[str, torch.Tensor]) -> bool:
        from .sd3_load import sai_prefix

        keys = set(keys)
        if any(k.endswith(m) for k in keys for m in FLUX_MARKERS):
            return False
        return sai_prefix(keys) is not None or all(any(k.endswith(m) for k in keys) for m in DIFFUSERS_MARKERS)

    @staticmethod
    def variant(bundle: ModelBundle) -> str:
        from .sd3_load import diffusers_variant

        return bundle.extra.get("sd3_variant") or diffusers_variant(bundle.unet.config)

    def architecture(self, v_pred: bool) -> str:
        return self.modelspec_arch

    def metadata(self, bundle: ModelBundle) -> dict[str, str]:
        """sd-scripts' values: ss_base_model_version is its model type (medium, 5-medium, 5-large)."""
        variant = self.variant(bundle)
        meta = {"ss_base_model_version": variant, "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.implementation": self.implementation,
                "modelspec.architecture": f"stable-diffusion-3-{variant}"}
        s = bundle.extra.get("sd3")
        if s is not None:
            opts = s["flow"]
            meta.update(ss_weighting_scheme=opts.weighting_scheme, ss_logit_mean=str(opts.logit_mean),
                        ss_logit_std=str(opts.logit_std), ss_mode_scale=str(opts.mode_scale),
                        ss_training_shift=str(s["shift"]), ss_apply_t5_attn_mask=str(s["t5_mask"]))
        return meta

    # settings ---------------------------------------------------------------------------------
    see_also = "weighting_scheme and training_shift"

    def flow_options(self, cfg: Any) -> flow.FlowOptions:
        return sd3_flow_options(cfg)

    def check(self, cfg: Any) -> list[str]:
        """The flow families' checks; FLUX-only settings are refused, training_shift must be positive."""
        notes = self.check_flow(cfg)
        for key in FLUX_ONLY:
            if getattr(cfg, key):
                raise ConfigError(key, getattr(cfg, key), f"applies to FLUX.1 only, not {self.label}")
        if not isinstance(cfg.training_shift, (int, float)) or not cfg.training_shift > 0:
            raise ConfigError("training_shift", cfg.training_shift, "must be a positive number")
        if cfg.train_t5xxl and not cfg.trains_text_encoder:
            raise ConfigError("train_t5xxl", True, "trains T5-XXL with the text encoders: select BASE in "
                                                  "network_blocks and keep the text-encoder rate above 0")
        return notes

    def prepare(self, bundle: ModelBundle, cfg: Any, device: torch.device) -> None:
        bundle.extra["sd3"] = {"flow": sd3_flow_options(cfg), "shift": float(cfg.training_shift),
                               "t5_length": int(cfg.t5xxl_max_token_length) or 256,
                               "t5_mask": bool(cfg.apply_t5_attn_mask)}

    @staticmethod
    def _settings(bundle: ModelBundle) -> dict:
        return bundle.extra.get("sd3") or {"flow": flow.FlowOptions(), "shift": 1.0, "t5_length": 256,
                                           "t5_mask": False}

    # conditioning -------------------------------------------------------------------------------
    def encode_prompts(self, bundle: ModelBundle, prompts: list[str], *, clip_skip: int,
                       grad: bool) -> Cond:
        """As diffusers' StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G penultimate states
        side by side, padded to T5's width, then T5's tokens (77 zero tokens without T5); pooled = both
        projected pooled outputs."""
        from .sd3_files import NoT5
        from .textenc import Cond

        s = self._settings(bundle)
        hidden, pooled = [], []
        for te, tok in zip(bundle.text_encoders[:2], bundle.tokenizers[:2]):
            ids = tok(prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                      return_tensors="pt").input_ids
            out = te(ids.to(device_of(te)), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        width = int(bundle.unet.config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        t5, t5_tok = bundle.text_encoders[2], bundle.tokenizers[2]
        if isinstance(t5, NoT5):  # 77 zero tokens, as sd-scripts (and diffusers 0.31) encode an absent T5
            t5_out = clip.new_zeros((len(prompts), CLIP_LENGTH, width))
        else:
            t5_out = t5_states(t5, t5_tok, prompts, s["t5_length"], s["t5_mask"])
        hidden_all = torch.cat([clip, t5_out.to(clip.device, clip.dtype)], dim=-2)
        return Cond(hidden_all, torch.cat([p.to(clip.device) for p in pooled], dim=-1))

    # the objective --------------------------------------------------------------------------------
    def sample_timesteps(self, cfg: Any, batch: int, latent_shape: tuple[int, ...], *,
                         generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """σ per sample, sd-scripts' draw: density, training_shift, t = floor(σ·1000)."""
        return flow.sd3_sample_sigmas(sd3_flow_options(cfg), batch, training_shift=float(cfg.training_shift),
                                      generator=generator, device=device)

    def target(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               v_pred: bool) -> torch.Tensor:
        return flow.sd3_target(latents, noise)

    def denoise(self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond,
                time_ids: torch.Tensor | None, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The transformer at t = σ·1000, turned into its x0 estimate prediction·(−σ) + noisy."""
        s = self._settings(bundle)
        x = noisy.to(device, dtype)
        out = bundle.unet(hidden_states=x, encoder_hidden_states=cond.hidden.to(device, dtype),
                          pooled_projections=cond.pooled.to(device, dtype),
                          timestep=flow.sd3_model_timestep(timesteps.to(device, torch.float32)).to(dtype),
                          return_dict=False)[0]
        pred, _ = flow.sd3_prediction(s["flow"], out, x.to(out.dtype), timesteps.to(device))
        return pred

    def latent_multiple(self, bundle: ModelBundle) -> int:
        return bundle.vae_factor * int(bundle.unet.config.patch_size)

    def native_size(self, bundle: ModelBundle) -> int:
        return 1024

    # sampling -------------------------------------------------------------------------------------------
    def sampling_scheduler(self, noise_scheduler: Any, sampler: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    def pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        from diffusers import StableDiffusion3Pipeline

        from .sd3_files import NoT5

        clip_l, clip_g, t5 = bundle.text_encoders
        tok_l, tok_g, tok_t5 = bundle.tokenizers
        real_t5 = not isinstance(t5, NoT5)
        return StableDiffusion3Pipeline(transformer=bundle.unet, scheduler=scheduler, vae=bundle.vae,
                                        text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
                                        text_encoder_3=t5 if real_t5 else None, tokenizer_3=tok_t5 if real_t5 else None)

    def pipeline_embeds(self, cond: Cond) -> dict[str, Any]:
        return {"prompt_embeds": cond.hidden[:1], "negative_prompt_embeds": cond.hidden[1:],
                "pooled_prompt_embeds": cond.pooled[:1], "negative_pooled_prompt_embeds": cond.pooled[1:]}
