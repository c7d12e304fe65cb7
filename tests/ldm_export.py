"""Test helper: write a diffusers bundle as an ldm (A1111) single file plus its .yaml.

The mapping is written out here independently of diffusers' converters, so a
round trip through the loader checks them against the ldm layout. The helpers
at the end compare a loaded bundle's outputs with its source's.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from trainer.families.bundle import ModelBundle

_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def _unet_prefixes(unet) -> list[tuple[str, str, list]]:
    """(diffusers prefix, ldm prefix, inner renames) for every U-Net part."""
    lpb = unet.config.layers_per_block
    out = [("time_embedding.linear_1.", "time_embed.0.", []), ("time_embedding.linear_2.", "time_embed.2.", []),
           ("add_embedding.linear_1.", "label_emb.0.0.", []), ("add_embedding.linear_2.", "label_emb.0.2.", []),
           ("conv_in.", "input_blocks.0.0.", []), ("conv_norm_out.", "out.0.", []), ("conv_out.", "out.2.", [])]
    for b in range(len(unet.down_blocks)):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            out.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", _RESNET))
            out.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.", []))
        out.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op.", []))
    out += [("mid_block.resnets.0.", "middle_block.0.", _RESNET), ("mid_block.attentions.0.", "middle_block.1.", []),
            ("mid_block.resnets.1.", "middle_block.2.", _RESNET)]
    for b, block in enumerate(unet.up_blocks):
        has_attn = getattr(block, "attentions", None) is not None
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            out.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0.", _RESNET))
            out.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.", []))
        last = b * (lpb + 1) + lpb
        out.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{last}.{2 if has_attn else 1}.conv.", []))
    return out


def _rename(sd: dict, prefixes: list[tuple[str, str, list]], what: str) -> dict:
    out = {}
    for key, value in sd.items():
        for old, new, inner in prefixes:
            if key.startswith(old):
                rest = key[len(old):]
                for a, b in inner:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                out[new + rest] = value.clone()
                break
        else:
            raise KeyError(f"{what}: no ldm name for {key}")
    return out


def unet_module_paths(unet) -> dict[str, str]:
    """diffusers module path -> checkpoint-layout module path, for every U-Net layer with weights."""
    names = [n for n, _ in unet.named_parameters()]
    ldm = _rename({n: torch.tensor(float(i)) for i, n in enumerate(names)}, _unet_prefixes(unet), "unet")
    return {names[int(v)].rsplit(".", 1)[0]: k.rsplit(".", 1)[0] for k, v in ldm.items()}


def kohya_unet_name(family: str, path: str, paths: dict[str, str]) -> str:
    """The file key of a U-Net layer: SDXL files use the checkpoint layout (`paths`, from
    unet_module_paths), SD1/SD2 diffusers paths."""
    target = paths[path] if family == "sdxl" else path
    return "lora_unet_" + target.replace(".", "_")


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    sd = _rename(unet.state_dict(), _unet_prefixes(unet), "unet")
    return {"model.diffusion_model." + k: v for k, v in sd.items()}


def vae_to_ldm(vae, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    pre = [("quant_conv.", "quant_conv.", []), ("post_quant_conv.", "post_quant_conv.", [])]
    for part in ("encoder", "decoder"):
        pre += [(f"{part}.conv_in.", f"{part}.conv_in.", []), (f"{part}.conv_out.", f"{part}.conv_out.", []),
                (f"{part}.conv_norm_out.", f"{part}.norm_out.", []),
                (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", [("conv_shortcut.", "nin_shortcut.")]),
                (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", [("conv_shortcut.", "nin_shortcut.")]),
                (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN)]
    for i in range(n):
        pre += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", []),
                (f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", []),
                (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.", []),
                (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", [])]
    sd = _rename(vae.state_dict(), pre, "vae")
    out = {}
    for key, value in sd.items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None].contiguous()  # ldm attention uses 1x1 convs
        out[prefix + key] = value
    return out


def _hf_clip(te) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights as `text_model.*` whatever the transformers version."""
    sd = {k if k.startswith("text_model.") else "text_model." + k: v.clone()
          for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    positions = te.config.max_position_embeddings
    sd["text_model.embeddings.position_ids"] = torch.arange(positions)[None]  # real SD1 files carry it
    return sd


def clip_to_ldm(te, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _hf_clip(te).items() if not k.startswith("text_projection")}


def open_clip_to_ldm(te, prefix: str, *, extra_layer: bool, seed: int = 123) -> dict[str, torch.Tensor]:
    """OpenCLIP layout; `extra_layer` appends a random last block (SD2 files have one more than used)."""
    src = {k[len("text_model."):]: v for k, v in _hf_clip(te).items() if k.startswith("text_model.")}
    hidden, n = te.config.hidden_size, te.config.num_hidden_layers
    out = {"token_embedding.weight": src["embeddings.token_embedding.weight"],
           "positional_embedding": src["embeddings.position_embedding.weight"],
           "ln_final.weight": src["final_layer_norm.weight"], "ln_final.bias": src["final_layer_norm.bias"],
           "logit_scale": torch.tensor(4.6052)}
    layers = [{k.split(".", 3)[3]: v for k, v in src.items() if k.startswith(f"encoder.layers.{i}.")} for i in range(n)]
    if extra_layer:
        g = torch.Generator().manual_seed(seed)
        layers.append({k: torch.randn(v.shape, generator=g) for k, v in layers[0].items()})
    for i, layer in enumerate(layers):
        p = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[p + f"attn.in_proj_{kind}"] = torch.cat([layer[f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[p + f"attn.out_proj.{kind}"] = layer[f"self_attn.out_proj.{kind}"]
            out[p + f"ln_1.{kind}"] = layer[f"layer_norm1.{kind}"]
            out[p + f"ln_2.{kind}"] = layer[f"layer_norm2.{kind}"]
            out[p + f"mlp.c_fc.{kind}"] = layer[f"mlp.fc1.{kind}"]
            out[p + f"mlp.c_proj.{kind}"] = layer[f"mlp.fc2.{kind}"]
    proj = getattr(te, "text_projection", None)
    out["text_projection"] = proj.weight.T.contiguous() if proj is not None else torch.randn(hidden, hidden)
    return {prefix + k: v.clone() for k, v in out.items()}


def export_ldm(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The whole bundle as one ldm state dict, laid out like an A1111 checkpoint of its family."""
    sd = {**unet_to_ldm(bundle.unet), **vae_to_ldm(bundle.vae)}
    tes = bundle.text_encoders
    if bundle.family.name == "sd1":
        sd.update(clip_to_ldm(tes[0], "cond_stage_model.transformer."))
    elif bundle.family.name == "sd2":
        sd.update(open_clip_to_ldm(tes[0], "cond_stage_model.model.", extra_layer=True))
    else:
        sd.update(clip_to_ldm(tes[0], "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(tes[1], "conditioner.embedders.1.model.", extra_layer=False))
    return sd


def _unet_yaml(unet, family: str) -> dict:
    c = unet.config
    base = c.block_out_channels[0]
    params = {
        "in_channels": c.in_channels, "out_channels": c.out_channels, "model_channels": base,
        "channel_mult": [ch // base for ch in c.block_out_channels], "num_res_blocks": c.layers_per_block,
        "attention_resolutions": [2 ** i for i, t in enumerate(c.down_block_types) if "CrossAttn" in t],
        "use_spatial_transformer": True, "context_dim": c.cross_attention_dim, "legacy": False,
        "use_linear_in_transformer": bool(c.use_linear_projection),
    }
    depth = c.transformer_layers_per_block
    params["transformer_depth"] = list(depth) if isinstance(depth, (list, tuple)) else depth
    heads = c.attention_head_dim
    if family == "sd1":
        params["num_heads"] = heads
    else:  # diffusers' "attention_head_dim" holds head counts here; ldm wants channels per head
        params["num_head_channels"] = base // (heads[0] if isinstance(heads, (list, tuple)) else heads)
    if family == "sdxl":
        params.update(num_classes="sequential", adm_in_channels=c.projection_class_embeddings_input_dim)
    return params


def _vae_yaml(vae) -> dict:
    c = vae.config
    ch = c.block_out_channels[0]
    return {"embed_dim": c.latent_channels, "ddconfig": {
        "double_z": True, "z_channels": c.latent_channels, "resolution": 256, "in_channels": c.in_channels,
        "out_ch": c.out_channels, "ch": ch, "ch_mult": [b // ch for b in c.block_out_channels],
        "num_res_blocks": c.layers_per_block, "attn_resolutions": [], "dropout": 0.0}}


def ldm_yaml(bundle: ModelBundle) -> dict:
    """An original (ldm/sgm) config describing the bundle's U-Net and VAE."""
    params: dict = {"scale_factor": float(bundle.vae.config.scaling_factor),
                    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                           "params": _vae_yaml(bundle.vae)}}
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": _unet_yaml(bundle.unet, bundle.family.name)}
    if bundle.family.name == "sdxl":
        params["network_config"] = unet
        outdim = bundle.unet.config.addition_time_embed_dim
        params["conditioner_config"] = {"params": {"emb_models": [
            {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": outdim}}]}}
    else:
        params["unet_config"] = unet
    if bundle.v_pred:
        params["parameterization"] = "v"
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def write_single_file(bundle: ModelBundle, path: str | Path, *, with_yaml: bool = True) -> Path:
    """Save `bundle` as an ldm checkpoint (.safetensors, or a weights-only torch pickle for
    .ckpt/.pt) and, with_yaml, the same-name .yaml beside it."""
    path = Path(path)
    sd = export_ldm(bundle)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1}, path)
    if with_yaml:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(ldm_yaml(bundle)), encoding="utf-8")
    return path


# --- comparing a loaded bundle with its source -------------------------------------------

def unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled_dim, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), ctx, **kw).sample


def vae_out(vae) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    img, lat = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    with torch.no_grad():
        return [vae.encode(img).latent_dist.mean, vae.decode(lat).sample]


def te_out(te) -> list[torch.Tensor]:
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70, list(range(49331, 49408))])
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
    res = [out.last_hidden_state, out.hidden_states[-2]]
    return res + ([out.text_embeds] if hasattr(out, "text_embeds") else [])


def outputs(bundle) -> dict[str, list[torch.Tensor]]:
    """U-Net, VAE and per-text-encoder outputs on fixed inputs."""
    out = {"unet": [unet_out(bundle.unet)], "vae": vae_out(bundle.vae)}
    for i, te in enumerate(bundle.text_encoders):
        out[f"te{i}"] = te_out(te)
    return out


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def assert_same_model(src, got, ref: dict | None = None) -> None:
    """U-Net, VAE and text encoder outputs within 1e-5 of the source bundle (or its outputs `ref`)."""
    ref = ref or outputs(src)
    new = outputs(got)
    assert ref.keys() == new.keys()
    for part in ref:
        assert max_diff(ref[part], new[part]) <= 1e-5, part
    for s, g in zip(src.text_encoders, got.text_encoders, strict=True):
        assert type(g) is type(s)


def assert_frozen(bundle, dtype=torch.float32) -> None:
    for module in bundle.modules():
        assert not module.training
        for p in module.parameters():
            assert not p.requires_grad and p.dtype == dtype and p.device.type == "cpu"
