"""FLUX.1 (dev and schnell): a flow-matching MMDiT (diffusers' FluxTransformer2DModel) with CLIP-L
(pooled) and T5-XXL (tokens) text encoders and a 16-channel autoencoder.

Latents are kept as the VAE makes them ([B, 16, H/8, W/8], shifted and scaled) everywhere in the
trainer; only `denoise` packs them into FLUX's 2×2 patch tokens and back. Timesteps are σ in
[0, 1] (`flow.py`), which is also what the transformer takes. LoRA files use sd-scripts' BFL key
layout (`flux_keys.py`); the files a user has are read by `flux_files.py`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from ..config.params import ConfigError
from . import flow
from .flowbase import FlowFamily, device_of, flow_options, t5_states
from .flux_net import FluxNetworkHooks

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .textenc import Cond

BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight")
CLIP_LENGTH = 77


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: FLUX's 2×2 patch tokens, row by row."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of `height` × `width` cells."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids [(H/2)(W/2), 3] of the patch tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Flux(FluxNetworkHooks, FlowFamily):
    name = "flux"
    label = "FLUX.1"
    text_encoder_count = 2
    vae_scale = 0.3611
    model_version = "flux1"
    modelspec_arch = "flux-1-dev"
    implementation = "https://github.com/black-forest-labs/flux"
    host_weights = False  # A1111 cannot hold FLUX; Forge holds it in inference-only storage

    @classmethod
    def claims(cls, keys: Iterable[str], state_dict: Mapping[str, torch.Tensor]) -> bool:
        keys = set(keys)
        return (any(k.endswith(BFL_MARKER) for k in keys)
                or all(any(k.endswith(m) for k in keys) for m in DIFFUSERS_MARKERS))

    @staticmethod
    def is_dev(bundle: ModelBundle) -> bool:
        """dev takes a guidance input; schnell has none."""
        return bool(bundle.unet.config.guidance_embeds)

    def architecture(self, v_pred: bool) -> str:
        return self.modelspec_arch

    def metadata(self, bundle: ModelBundle) -> dict[str, str]:
        s = bundle.extra.get("flux")
        meta = {"ss_base_model_version": self.model_version, "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.implementation": self.implementation,
                "modelspec.architecture": "flux-1-dev" if self.is_dev(bundle) else "flux-1-schnell"}
        if s is not None:
            meta.update(ss_guidance_scale=str(s["guidance"]), ss_timestep_sampling=s["flow"].timestep_sampling,
                        ss_sigmoid_scale=str(s["flow"].sigmoid_scale),
                        ss_model_prediction_type=s["flow"].model_prediction_type,
                        ss_discrete_flow_shift=str(s["flow"].discrete_flow_shift),
                        ss_apply_t5_attn_mask=str(s["t5_mask"]))
        return meta

    # settings ---------------------------------------------------------------------------------
    def check(self, cfg: Any) -> list[str]:
        """The flow families' checks, then FLUX's own: swap only without text-encoder training, and a
        T5 LoRA only with it."""
        notes = self.check_flow(cfg)
        if cfg.blocks_to_swap and cfg.trains_text_encoder:
            raise ConfigError("blocks_to_swap", cfg.blocks_to_swap, "works with the transformer's network only; "
                                                                   "turn text-encoder training off (BASE)")
        if cfg.train_t5xxl and not cfg.trains_text_encoder:
            raise ConfigError("train_t5xxl", True, "trains T5-XXL with the text encoders: select BASE in "
                                                  "network_blocks and keep the text-encoder rate above 0")
        return notes

    def prepare(self, bundle: ModelBundle, cfg: Any, device: torch.device) -> None:
        length = int(cfg.t5xxl_max_token_length) or (512 if self.is_dev(bundle) else 256)
        bundle.extra["flux"] = {"flow": flow_options(cfg), "guidance": float(cfg.guidance_scale),
                                "t5_length": length, "t5_mask": bool(cfg.apply_t5_attn_mask)}
        if cfg.fp8_base:
            from ..training.blockswap import flux_blocks
            from ..training.fp8 import apply_fp8_base, check_fp8

            check_fp8(device, dora=bool(cfg.network_dora))
            if not bundle.extra.get("fp8_base"):  # a loader keeps the converted model for fp8 jobs only
                dtype = next(bundle.unet.parameters()).dtype
                for block in flux_blocks(bundle.unet):
                    apply_fp8_base(block, dtype)
                bundle.extra["fp8_base"] = True

    def place(self, bundle: ModelBundle, cfg: Any, device: torch.device) -> Callable[[], None] | None:
        """With blocks_to_swap, only the blocks that compute next are on the device."""
        if not cfg.blocks_to_swap:
            bundle.unet.to(device)
            return None
        from ..training.blockswap import enable_block_swap, flux_blocks, move_except

        blocks = flux_blocks(bundle.unet)
        move_except(bundle.unet, blocks, device)
        swap = enable_block_swap(blocks, int(cfg.blocks_to_swap), device=device)
        bundle.extra["block_swap"] = swap

        def undo() -> None:
            bundle.extra.pop("block_swap", None)
            swap.remove()

        return undo

    @staticmethod
    def _settings(bundle: ModelBundle) -> dict:
        s = bundle.extra.get("flux")
        if s is None:  # a bundle used before any job: sd-scripts' defaults
            s = {"flow": flow.FlowOptions(), "guidance": 1.0, "t5_mask": False,
                 "t5_length": 512 if Flux.is_dev(bundle) else 256}
        return s

    # conditioning -------------------------------------------------------------------------------
    def encode_prompts(self, bundle: ModelBundle, prompts: list[str], *, clip_skip: int,
                       grad: bool) -> Cond:
        """CLIP-L's pooled output and T5-XXL's token states, as FLUX's pipeline encodes them."""
        from .textenc import Cond

        s = self._settings(bundle)
        clip, t5 = bundle.text_encoders
        clip_tok, t5_tok = bundle.tokenizers
        ids = clip_tok(prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                       return_tensors="pt").input_ids
        pooled = clip(ids.to(device_of(clip)), output_hidden_states=False).pooler_output
        hidden = t5_states(t5, t5_tok, prompts, s["t5_length"], s["t5_mask"])
        return Cond(hidden, pooled.to(hidden.device))

    # the objective --------------------------------------------------------------------------------
    def denoise(self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond,
                time_ids: torch.Tensor | None, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Pack, run the transformer, unpack, then the model_prediction_type transform."""
        s = self._settings(bundle)
        swap = bundle.extra.get("block_swap")
        if swap is not None:
            swap.prepare()
        b, _, h, w = noisy.shape
        txt = cond.hidden.to(device, dtype)
        guidance = torch.full((b,), s["guidance"], device=device, dtype=dtype) if self.is_dev(bundle) else None
        out = bundle.unet(hidden_states=pack(noisy.to(device, dtype)), encoder_hidden_states=txt,
                          pooled_projections=cond.pooled.to(device, dtype), timestep=timesteps.to(device, dtype),
                          img_ids=image_ids(h, w, device, dtype),
                          txt_ids=torch.zeros(txt.shape[1], 3, device=device, dtype=dtype),
                          guidance=guidance, return_dict=False)[0]
        pred, _ = flow.apply_prediction_type(s["flow"], unpack(out, h, w), noisy.to(device, out.dtype), timesteps)
        return pred

    def latent_multiple(self, bundle: ModelBundle) -> int:
        return bundle.vae_factor * 2  # 2×2 patches

    def native_size(self, bundle: ModelBundle) -> int:
        return 1024

    # sampling -------------------------------------------------------------------------------------------
    def sampling_scheduler(self, noise_scheduler: Any, sampler: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    def pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        from diffusers import FluxPipeline

        clip, t5 = bundle.text_encoders
        clip_tok, t5_tok = bundle.tokenizers
        return FluxPipeline(scheduler=scheduler, vae=bundle.vae, text_encoder=clip, tokenizer=clip_tok,
                            text_encoder_2=t5, tokenizer_2=t5_tok, transformer=bundle.unet)

    def pipeline_embeds(self, cond: Cond) -> dict[str, Any]:
        return {"prompt_embeds": cond.hidden[:1], "pooled_prompt_embeds": cond.pooled[:1]}

    def pipeline_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack(latents, height // 8, width // 8) if latents.dim() == 3 else latents
