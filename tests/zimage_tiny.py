"""Tiny random Z-Image parts built in code, and writers for the files users have.

Transformer: 2 layers, 1 noise and 1 context refiner, width 64 in 2 heads of 32 (rotary axes
8/12/12, Z-Image's 1/4-then-3/8 split of its 128). Qwen3: 2 layers of width 32 over a small
word-level tokenizer made here, with Qwen's special tokens and a chat template written out as
Qwen3's renders one user turn. Autoencoder: tests/flux_tiny.py's (Z-Image uses FLUX.1's).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from typing import Any


from tests.flux_tiny import save_ae, tiny_flux_ae

WORDS = ("a photo of the cat dog on red blue green sitting table with in at sks person style painting "
         "drawing picture man woman tree house car user assistant system").split()
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
# What Qwen3's own template renders for one user message with add_generation_prompt (thinking on).
CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                 "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                 "{%- endif %}{%- endif %}")
CAP_DIM = 32


def tiny_qwen_tokenizer(template: bool = True) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", model_max_length=1024)
    if template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(
        vocab_size=len(tiny_qwen_tokenizer()), hidden_size=CAP_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0))


def tiny_zimage_transformer():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=CAP_DIM, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[64, 32, 32])


@dataclass
class TinyZImage:
    transformer: torch.nn.Module
    qwen3: Any
    vae: torch.nn.Module


def tiny_zimage(seed: int = 0) -> TinyZImage:
    """Random tiny Z-Image parts, fp32, eval mode, frozen."""
    torch.manual_seed(seed)
    parts = TinyZImage(tiny_zimage_transformer(), tiny_qwen3(), tiny_flux_ae())
    for m in (parts.transformer, parts.qwen3, parts.vae):
        m.eval().requires_grad_(False)
    return parts


def tiny_zimage_bundle(seed: int = 0):
    """The tiny parts as a ModelBundle of the Z-Image family."""
    from trainer.families.bundle import ModelBundle
    from trainer.families.zimage_load import scheduler

    parts = tiny_zimage(seed)
    return ModelBundle(family="zimage", unet=parts.transformer, vae=parts.vae, text_encoders=[parts.qwen3],
                       tokenizers=[tiny_qwen_tokenizer()], noise_scheduler=scheduler(), name="tiny-zimage")


def diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original (Tongyi / ComfyUI) layout of a diffusers ZImageTransformer2DModel state dict."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            stem = key.split(".attention.to_q.")[0] + ".attention."
            out[stem + "qkv.weight"] = torch.cat([sd[stem + f"to_{p}.weight"] for p in "qkv"])
            continue
        name = key.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
        name = name.replace(".attention.norm_k.", ".attention.k_norm.")
        name = name.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        out[name] = value
    out["norm_final.weight"] = torch.ones(1)  # the original files carry it; diffusers has no such weight
    return out


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def save_zimage_files(parts: TinyZImage, folder: Path, *, prefix: str = "model.diffusion_model.",
                      tokenizer_dir: str | None = "qwen3_tokenizer") -> dict[str, Path]:
    """ComfyUI's split files: original-layout transformer, Qwen3 (``model.*``), FLUX's ae; the tokenizer
    in `tokenizer_dir` next to the Qwen3 file (None: no tokenizer)."""
    files = {"model": _save({prefix + k: v for k, v in diffusers_to_original(parts.transformer.state_dict()).items()},
                            folder / "z_image_turbo.safetensors"),
             "qwen3": _save({"model." + k: v for k, v in parts.qwen3.state_dict().items()},
                            folder / "qwen_3_4b.safetensors"),
             "vae": save_ae(parts.vae, folder / "ae.safetensors")}
    if tokenizer_dir is not None:
        tiny_qwen_tokenizer().save_pretrained(str(folder / tokenizer_dir))
    return files


def save_zimage_folder(parts: TinyZImage, folder: Path) -> Path:
    """A diffusers Z-Image folder (as ZImagePipeline.save_pretrained lays it out)."""
    from trainer.families.zimage_load import scheduler

    parts.transformer.save_pretrained(str(folder / "transformer"))
    parts.qwen3.save_pretrained(str(folder / "text_encoder"))
    parts.vae.save_pretrained(str(folder / "vae"))
    tiny_qwen_tokenizer().save_pretrained(str(folder / "tokenizer"))
    scheduler().save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "ZImagePipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder
