"""Saved files reproduce the in-memory network where users load them.

LoRA/LoCon: diffusers ``load_lora_weights`` (needs peft). Every algorithm,
DoRA included: an independent merge written here the way A1111's built-in
Lora applies a file (alpha/rank scale, Hadamard product, Kronecker product,
per-input-channel DoRA magnitude).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.ldm_export import kohya_unet_name, unet_module_paths
from tests.tiny import tiny_bundle
from trainer.config.schema import TrainConfig
from trainer.networks.network import Network

TOL = 1e-4
# SD1's deepest level is then 2x2; at 1x1, GroupNorm over 2 values per group
# turns float rounding into 1e-3 noise.
SIDE = 16


def make_net(family: str, ntype: str, dora: bool = False) -> tuple:
    bundle = tiny_bundle(family)
    cfg = TrainConfig(network_type=ntype, network_dora=dora, network_rank=4, network_alpha=2.0,
                      network_conv_rank=2, network_conv_alpha=3.0, save_lora_name="rt")
    net = Network.build(bundle, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained-looking, non-zero delta everywhere
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return bundle, net


def outputs(bundle) -> list[torch.Tensor]:
    """U-Net output and each text encoder's last hidden state on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, SIDE, SIDE, generator=g)
    enc = torch.randn(1, 8, bundle.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if bundle.family.name == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)}
    ids = torch.randint(0, 49406, (1, 12), generator=g)
    with torch.no_grad():
        outs = [bundle.unet(x, torch.tensor([500]), enc, **kw).sample]
        outs += [te(ids).last_hidden_state for te in bundle.text_encoders]
    return outs


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], base: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w, b in zip(got, want, base):
        assert (w - b).abs().max() > 1e-3  # the network does change this output
        assert (g - w).abs().max() < TOL


# ---- diffusers ---------------------------------------------------------------
def pipeline(bundle):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    # steps_offset=1 only silences the pipeline's deprecation notice; sampling is not used here
    sched = DDPMScheduler.from_config(bundle.noise_scheduler.config, steps_offset=1)
    if bundle.family.name == "sdxl":
        te1, te2 = bundle.text_encoders
        tok1, tok2 = bundle.tokenizers
        return StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=bundle.unet, scheduler=sched)
    return StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0],
                                   unet=bundle.unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.needs_peft
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("ntype", ["lierla", "c3lier"])
def test_diffusers_reload_matches(tmp_path, family: str, ntype: str) -> None:
    base = outputs(tiny_bundle(family))
    bundle, net = make_net(family, ntype)
    want = outputs(bundle)
    net.save(tmp_path / "net.safetensors", dtype=torch.float32, metadata={})
    fresh = tiny_bundle(family)
    pipe = pipeline(fresh)
    pipe.load_lora_weights(str(tmp_path), weight_name="net.safetensors")
    assert_close(outputs(fresh), want, base)


# ---- independent merge (A1111 built-in Lora arithmetic) ------------------------
def kohya_modules(bundle) -> dict[str, nn.Module]:
    """File key -> module of a bundle, text encoders named through ``text_model``
    (SDXL U-Net keys in the checkpoint layout, through tests/ldm_export's mapping)."""
    paths = unet_module_paths(bundle.unet)
    out = {kohya_unet_name(bundle.family.name, n, paths): m for n, m in bundle.unet.named_modules() if n in paths}
    prefixes = ["lora_te"] if len(bundle.text_encoders) == 1 else ["lora_te1", "lora_te2"]
    for prefix, te in zip(prefixes, bundle.text_encoders):
        lead = "" if hasattr(te, "text_model") else "text_model."  # transformers 5 CLIPTextModel
        out.update({f"{prefix}_" + (lead + n).replace(".", "_"): m for n, m in te.named_modules() if n})
    return out


def delta_and_dim(t: dict[str, torch.Tensor], shape: torch.Size) -> tuple[torch.Tensor, int | None]:
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        return (up.flatten(1) @ down.flatten(1)).reshape(shape), down.shape[0]
    if "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return delta.reshape(shape), t["hada_w1_b"].shape[0]
    w1 = t["lokr_w1"]
    if "lokr_w2" in t:
        w2, dim = t["lokr_w2"], None  # both factors full: no alpha scaling
    else:
        w2, dim = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape), dim


def merge_file(bundle, sd: dict[str, torch.Tensor]) -> int:
    """Add every module's delta from `sd` into the bundle's weights; returns the count."""
    mods = kohya_modules(bundle)
    names = {k.split(".", 1)[0] for k in sd}
    for name in names:
        t = {k.split(".", 1)[1]: v.double() for k, v in sd.items() if k.startswith(name + ".")}
        weight = mods[name].weight
        delta, dim = delta_and_dim(t, weight.shape)
        scale = t["alpha"].item() / dim if dim else 1.0
        merged = weight.double() + delta * scale
        if "dora_scale" in t:  # magnitude per input channel, as A1111 applies it
            n_in = merged.shape[1]
            norm = merged.transpose(0, 1).reshape(n_in, -1).norm(dim=1, keepdim=True)
            norm = norm.reshape(n_in, *[1] * (merged.dim() - 1)).transpose(0, 1)
            merged = merged * (t["dora_scale"] / norm)
        with torch.no_grad():
            weight.copy_(merged.to(weight.dtype))
    return len(names)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("ntype,dora", [("lierla", False), ("c3lier", False), ("loha", False), ("lokr", False),
                                        ("lierla", True), ("c3lier", True)])
def test_reference_merge_matches(tmp_path, family: str, ntype: str, dora: bool) -> None:
    base = outputs(tiny_bundle(family))
    bundle, net = make_net(family, ntype, dora)
    want = outputs(bundle)
    sd = load_file(str(net.save(tmp_path / "net.safetensors", dtype=torch.float32, metadata={})))
    fresh = tiny_bundle(family)
    assert merge_file(fresh, sd) == len(net.module_names())
    assert_close(outputs(fresh), want, base)
