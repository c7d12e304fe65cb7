"""Z-Image's key layouts: the original single-file layout read as diffusers reads it, the config read
off the shapes, and LoRA files in the layout ComfyUI maps for Z-Image, every key naming a real layer."""
from __future__ import annotations

import pytest
import torch

from trainer.families.zimage import ZImage
from trainer.families.zimage_keys import (BLOCK_LINEARS, ZImageKeyError, from_file, layout, memory_to_file,
                                          original_to_diffusers, to_file, transformer_config)

from tests.zimage_tiny import diffusers_to_original, tiny_zimage_bundle

pytestmark = pytest.mark.needs_zimage


def test_the_original_layout_converts_as_diffusers_converts_it():
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    sd = tiny_zimage_bundle().unet.state_dict()
    original = diffusers_to_original(sd)
    assert layout({f"model.diffusion_model.{k}": v for k, v in original.items()}) == ("original", "model.diffusion_model.")
    assert layout(sd) == ("diffusers", "")
    theirs = convert_z_image_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v for k, v in original.items()})
    ours = original_to_diffusers(dict(original))
    assert set(ours) == set(theirs) == set(sd)
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], sd[k]) for k in sd)


def test_the_config_read_off_the_shapes_rebuilds_the_model():
    from diffusers import ZImageTransformer2DModel

    model = tiny_zimage_bundle().unet
    config = transformer_config(model.state_dict())
    for key in ("in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "cap_feat_dim"):
        assert config[key] == model.config[key], key
    assert config["axes_dims"] == list(model.config.axes_dims)
    rebuilt = ZImageTransformer2DModel.from_config(config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert transformer_config({k: torch.zeros(4096, 128) if k == "layers.0.attention.norm_q.weight" else v
                               for k, v in model.state_dict().items()} | {"layers.0.attention.norm_q.weight": torch.zeros(128)}
                              )["axes_dims"] == [32, 48, 48]  # Z-Image's own split of 128-wide heads


def comfyui_z_image_loras(n_layers: int, n_refiners: int, context_adaln: bool = False) -> set[str]:
    """The diffusers-side LoRA names ComfyUI's Lumina2 branch of model_lora_keys_unet accepts for a
    Z-Image model's blocks (z_image_to_diffusers: to_q/to_k/to_v sliced into qkv, to_out.0, w1-w3,
    adaLN_modulation.0), under the ``diffusion_model.`` prefix."""
    names = set()
    blocks = ([("layers", i, True) for i in range(n_layers)] + [("noise_refiner", i, True) for i in range(n_refiners)]
              + [("context_refiner", i, context_adaln) for i in range(n_refiners)])
    for block, i, adaln in blocks:
        inner = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"] + (["adaLN_modulation.0"] if adaln else [])
        names |= {f"diffusion_model.{block}.{i}.{name}" for name in inner}
    return names


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_every_file_key_names_a_real_layer_in_comfyuis_z_image_layout(algo):

    bundle = tiny_zimage_bundle()
    model = bundle.unet
    net = _lycoris(model, algo)
    written = to_file(net.state_dict())
    modules = dict(model.named_modules())
    names = {k.split(".lora_")[0].split(".hada_")[0].split(".lokr_")[0].rsplit(".alpha", 1)[0] for k in written}
    comfy = comfyui_z_image_loras(model.config.n_layers, model.config.n_refiner_layers)
    assert names == comfy  # every layer ComfyUI maps, and nothing else
    for name in names:
        layer = modules[name[len("diffusion_model."):]]
        assert isinstance(layer, torch.nn.Linear), name
    if algo == "lora":
        for name in names:
            layer = modules[name[len("diffusion_model."):]]
            assert written[f"{name}.lora_down.weight"].shape[1] == layer.in_features
            assert written[f"{name}.lora_up.weight"].shape[0] == layer.out_features


def _lycoris(model, algo):
    from lycoris.kohya import LycorisNetworkKohya

    names = ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE")
    saved = {n: getattr(LycorisNetworkKohya, n) for n in names}
    try:
        LycorisNetworkKohya.apply_preset({"unet_target_module": ZImage().network_targets(False),
                                          "unet_target_name": [], "text_encoder_target_module": []})
        net = LycorisNetworkKohya(None, model, multiplier=1.0, lora_dim=4, alpha=2.0, network_module=algo)
    finally:
        for n, v in saved.items():
            setattr(LycorisNetworkKohya, n, v)
    net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    return net


def test_file_names_round_trip_and_strangers_are_refused():
    sd = {f"lora_unet_{b}_{i}_{inner.replace('.', '_')}.lora_down.weight": torch.zeros(1)
          for b in ("layers", "noise_refiner", "context_refiner") for i in (0, 11) for inner in BLOCK_LINEARS}
    sd["lora_te_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(1)
    there = to_file(sd)
    assert "diffusion_model.layers.11.attention.to_out.0.lora_down.weight" in there
    assert "diffusion_model.context_refiner.0.adaLN_modulation.0.lora_down.weight" in there
    assert "lora_te_layers_0_self_attn_q_proj.lora_up.weight" in there
    assert from_file(there) == sd
    assert memory_to_file("lora_unet_noise_refiner_1_feed_forward_w3") == "diffusion_model.noise_refiner.1.feed_forward.w3"
    with pytest.raises(ZImageKeyError):
        memory_to_file("lora_unet_t_embedder_mlp_0")
    with pytest.raises(ZImageKeyError):
        from_file({"diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.zeros(1)})
