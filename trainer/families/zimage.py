"""Z-Image (Turbo and base): a single-stream flow-matching DiT (diffusers' ZImageTransformer2DModel)
with a Qwen3 text encoder and FLUX.1's 16-channel autoencoder.

Latents stay as the VAE makes them ([B, 16, H/8, W/8], shifted and scaled by the VAE config);
the transformer patches them 2×2 itself and takes them as a list of [C, 1, H, W] frames, with
each prompt's embeddings cut to its real tokens. The trainer's timestep is σ (noisy =
(1 − σ)·x0 + σ·noise, target noise − x0, as for FLUX); ZImagePipeline passes the transformer
t = (1000 − σ·1000)/1000 = 1 − σ and steps with the negated output, so `denoise` passes 1 − σ
and negates the output (`model_timestep`). Turbo and base share the transformer config and the
scheduler config (shift 3.0, no dynamic shifting), so they train the same.

Prompts are encoded as the pipeline encodes them: Qwen3's chat template around the prompt (one
user turn, generation prompt added), padded to max length, the second-to-last hidden layer. The
family's Cond carries that padding mask in ``pooled`` (Z-Image has no pooled embedding), so
cached captions keep it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from ..config.params import ConfigError
from . import flow
from .flowbase import FlowFamily, flow_options
from .zimage_keys import BLOCK_LISTS, from_file, layout, to_file

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .textenc import Cond

MAX_LENGTH = 512  # ZImagePipeline's max_sequence_length
# Qwen3's chat template for one user turn with the generation prompt (enable_thinking=True adds nothing);
# used only when a tokenizer comes without its template.
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_BLOCK_IDS = {"layers": "L", "noise_refiner": "NR", "context_refiner": "CR"}


def model_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's t for noise level σ: ZImagePipeline passes (1000 − σ·1000)/1000 = 1 − σ."""
    return 1.0 - sigma


def chat_prompts(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Each prompt inside Qwen3's chat template, as ZImagePipeline._encode_prompt wraps it."""
    template = None if getattr(tokenizer, "chat_template", None) else QWEN3_TEMPLATE
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                          enable_thinking=True, chat_template=template) for p in prompts]


def caption_list(cond: Cond, dtype: torch.dtype | None = None, device: torch.device | None = None) -> list[torch.Tensor]:
    """Each prompt's embeddings cut to its real tokens (the mask rides in ``cond.pooled``)."""
    mask = cond.pooled > 0.5
    return [cond.hidden[i][mask[i].to(cond.hidden.device)].to(device=device, dtype=dtype) for i in range(len(cond))]


class ZImage(FlowFamily):
    name = "zimage"
    label = "Z-Image"
    text_encoder_count = 1
    pad_tokens = ("<|endoftext|>",)
    vae_scale = 0.3611
    model_version = "z_image"
    modelspec_arch = "z-image"
    implementation = "https://github.com/Tongyi-MAI/Z-Image"
    host_weights = False  # the WebUI hosts' diffusers (0.31) cannot hold it

    @classmethod
    def claims(cls, keys: Iterable[str], state_dict: Mapping[str, torch.Tensor]) -> bool:
        return layout(keys) is not None

    def metadata(self, bundle: ModelBundle) -> dict[str, str]:
        meta = {"ss_base_model_version": self.model_version, "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.implementation": self.implementation, "modelspec.architecture": self.modelspec_arch}
        s = bundle.extra.get("zimage")
        if s is not None:
            meta.update(ss_timestep_sampling=s["flow"].timestep_sampling,
                        ss_discrete_flow_shift=str(s["flow"].discrete_flow_shift),
                        ss_model_prediction_type=s["flow"].model_prediction_type,
                        ss_weighting_scheme=s["flow"].weighting_scheme)
        return meta

    # settings ---------------------------------------------------------------------------------
    def check(self, cfg: Any) -> list[str]:
        """The flow families' checks; min-SNR is left out with a message, as is a Qwen3 LoRA."""
        notes = self.check_flow(cfg)
        if int(cfg.qwen3_max_token_length) < 1:
            raise ConfigError("qwen3_max_token_length", cfg.qwen3_max_token_length, "must be at least 1")
        if cfg.trains_text_encoder:
            notes.append(f"{self.label}: the network covers the transformer; its Qwen3 text encoder is not trained")
        return notes

    def prepare(self, bundle: ModelBundle, cfg: Any, device: torch.device) -> None:
        bundle.extra["zimage"] = {"flow": flow_options(cfg), "length": int(cfg.qwen3_max_token_length)}

    @staticmethod
    def _settings(bundle: ModelBundle) -> dict:
        return bundle.extra.get("zimage") or {"flow": flow.FlowOptions(), "length": MAX_LENGTH}

    # conditioning ---------------------------------------------------------------------------------
    def encode_prompts(self, bundle: ModelBundle, prompts: list[str], *, clip_skip: int, grad: bool) -> Cond:
        """Qwen3's second-to-last hidden layer over the chat-templated prompt; the mask in ``pooled``."""
        from .textenc import Cond

        (encoder,), (tokenizer,) = bundle.text_encoders, bundle.tokenizers
        tokens = tokenizer(chat_prompts(tokenizer, list(prompts)), padding="max_length",
                           max_length=self._settings(bundle)["length"], truncation=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        mask = tokens.attention_mask.to(device).bool()
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            hidden = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                             output_hidden_states=True).hidden_states[-2]
        return Cond(hidden, mask.to(hidden.dtype))

    # the objective ------------------------------------------------------------------------------------
    def denoise(self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond,
                time_ids: torch.Tensor | None, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The transformer on [C, 1, H, W] frames at t = 1 − σ; its output negated is the velocity."""
        frames = list(noisy.to(device, dtype).unsqueeze(2).unbind(0))
        out = bundle.unet(frames, model_timestep(timesteps.to(device, dtype)), caption_list(cond, dtype, device),
                          return_dict=False)[0]
        velocity = -torch.stack(out, dim=0).squeeze(2)
        pred, _ = flow.apply_prediction_type(self._settings(bundle)["flow"], velocity,
                                             noisy.to(device, velocity.dtype), timesteps)
        return pred

    def latent_multiple(self, bundle: ModelBundle) -> int:
        return bundle.vae_factor * 2  # 2×2 patches

    def native_size(self, bundle: ModelBundle) -> int:
        return 1024

    # blocks ---------------------------------------------------------------------------------------------
    def block_ids(self) -> tuple[str, ...]:
        return (*(f"NR{i:02d}" for i in range(2)), *(f"CR{i:02d}" for i in range(2)), *(f"L{i:02d}" for i in range(30)))

    def block_id(self, module_name: str) -> str | None:
        parts = module_name.split(".")
        if len(parts) < 2 or parts[0] not in _BLOCK_IDS or not parts[1].isdigit():
            return None
        return f"{_BLOCK_IDS[parts[0]]}{int(parts[1]):02d}"

    def selector(self, blocks: Iterable[str], element: str,
                 scope: Mapping[str, Any] | None = None) -> Callable[[str], bool]:
        """Every transformer block (the U-Net block IDs of TrainTrain do not apply to Z-Image)."""
        if element != "Full":
            raise ConfigError("network_element", element, f"{self.label} networks cover whole blocks (Full)")
        return lambda name: name.split(".")[0] in BLOCK_LISTS

    # networks and files -------------------------------------------------------------------------------
    def network_targets(self, trains_convs: bool) -> list[str]:
        return ["ZImageTransformerBlock"]

    def network_text_encoders(self, bundle: ModelBundle, scope: Mapping[str, Any] | None = None) -> list[torch.nn.Module]:
        return []

    def to_file(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_file(state_dict)

    def from_file(self, state_dict: dict[str, torch.Tensor],
                  target: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
        return from_file(state_dict)

    # sampling -------------------------------------------------------------------------------------------
    def sampling_scheduler(self, noise_scheduler: Any, sampler: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    def pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        from diffusers import ZImagePipeline

        return ZImagePipeline(scheduler=scheduler, vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                              tokenizer=bundle.tokenizers[0], transformer=bundle.unet)

    def pipeline_embeds(self, cond: Cond) -> dict[str, Any]:
        both = caption_list(cond)
        return {"prompt_embeds": both[:1], "negative_prompt_embeds": both[1:]}
