"""Every key of a saved file finds its layer the way AUTOMATIC1111 1.10.1's built-in Lora looks it up.

The lookup is written here from that extension's behaviour: a key's module part first goes
through its diffusers-to-compvis converter (which assumes SD1's U-Net layout), then the
q/k/v-projection fallback, then original-model names pass through with ``lora_unet`` read
as ``diffusion_model`` (``lora_te1_text_model`` as ``0_transformer_text_model``). A key
that finds nothing is dropped by the host without an error, so none may. The layer found
must also be the one the network trained: checked through tests/ldm_export's own mapping
of the diffusers model to its checkpoint layout.
"""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from tests.ldm_export import export_ldm, unet_module_paths
from tests.tiny import tiny_bundle
from trainer.config.schema import TrainConfig
from trainer.networks.network import Network

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _suffix(kind: str, name: str) -> str:
    return _RESNET.get(name, name) if kind == "resnets" else name


def _open_clip(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def compvis(key: str, is_sd2: bool) -> str:
    """The host's converter: diffusers-style names to compvis, SD1's U-Net layout assumed."""
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
         f"{_suffix(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
         f"{_suffix(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m:
         f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m:
         f"model_transformer_resblocks_{m[1]}_{_open_clip(m[2])}" if is_sd2
         else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"1_model_transformer_resblocks_{m[1]}_{_open_clip(m[2])}"),
    ]
    for pattern, build in rules:
        m = re.match(pattern, key)
        if m:
            return build(m)
    return key


def host_lookup(module: str, layers: set[str], is_sd2: bool) -> str | None:
    """The host layer name a file's module key lands on, or None (dropped)."""
    key = compvis(module, is_sd2)
    if key in layers:
        return key
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if m and m[1] in layers:
        return m[1]
    if "lora_unet" in module:
        key = module.replace("lora_unet", "diffusion_model")
        return key if key in layers else None
    if "lora_te1_text_model" in module:
        for new in ("0_transformer_text_model", "transformer_text_model"):
            key = module.replace("lora_te1_text_model", new)
            if key in layers:
                return key
    return None


_TE_PREFIXES = {"sd1": [("cond_stage_model.", "")], "sd2": [("cond_stage_model.", "")],
                "sdxl": [("conditioner.embedders.0.", "0_"), ("conditioner.embedders.1.", "1_")]}


def host_layers(bundle) -> set[str]:
    """The host's layer names (``network_layer_name``) of this model's checkpoint layout."""
    out = set()
    for key in export_ldm(bundle):
        module = key.rsplit(".", 1)[0]
        if key.startswith("model.diffusion_model."):
            out.add(module[len("model."):].replace(".", "_"))
        for prefix, lead in _TE_PREFIXES[bundle.family.name]:
            if key.startswith(prefix):
                out.add(lead + module[len(prefix):].replace(".", "_"))
    return out


def unet_layer_paths(unet) -> dict[str, str]:
    """Host U-Net layer name -> diffusers module path, through tests/ldm_export's mapping."""
    return {"diffusion_model_" + ldm.replace(".", "_"): path for path, ldm in unet_module_paths(unet).items()}


def trained_net(family: str, ntype: str, dora: bool = False) -> tuple:
    bundle = tiny_bundle(family)
    cfg = TrainConfig(network_type=ntype, network_dora=dora, network_rank=4, network_alpha=2.0,
                      network_conv_rank=2, network_conv_alpha=1.0, save_lora_name="k",
                      train_textencoder_learning_rate=1e-5)
    assert cfg.trains_text_encoder
    return bundle, Network.build(bundle, cfg)


CASES = [(f, t, d) for f in ("sd1", "sd2", "sdxl")
         for t, d in (("lierla", False), ("c3lier", False), ("loha", False), ("lokr", False),
                      ("lierla", True), ("c3lier", True))]


@pytest.mark.parametrize("family,ntype,dora", CASES)
def test_no_key_is_dropped_by_the_host(tmp_path, family: str, ntype: str, dora: bool) -> None:
    bundle, net = trained_net(family, ntype, dora)
    sd = load_file(str(net.save(tmp_path / "k.safetensors", dtype=torch.float32, metadata={})))
    layers, paths = host_layers(bundle), unet_layer_paths(bundle.unet)
    memory = {net.file_names.get(n, n): n for n in net.module_names()}
    modules = {k.split(".", 1)[0] for k in sd}
    assert modules == set(memory) and len(modules) == len(net.module_names())
    assert any(m.startswith("lora_te") for m in modules)
    for module in sorted(modules):
        found = host_lookup(module, layers, family == "sd2")
        assert found is not None, f"{family} {ntype}: the host drops {module}"
        if module.startswith("lora_unet_"):
            trained = memory[module][len("lora_unet_"):]
            assert paths[found].replace(".", "_") == trained, f"{module} lands on {found}, trained {trained}"


@pytest.mark.parametrize("ntype", ["lierla", "c3lier", "loha", "lokr"])
def test_sdxl_unet_keys_use_the_original_layout(ntype: str) -> None:
    _, net = trained_net("sdxl", ntype)
    unet = [k for k in net.state_dict_kohya() if k.startswith("lora_unet_")]
    assert unet and all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", k) for k in unet)
    if ntype != "lierla":  # the layer A1111 used to drop: SDXL's first upsampler
        assert "lora_unet_output_blocks_2_2_conv.alpha" in unet


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd1_sd2_keep_diffusers_names(family: str) -> None:
    _, net = trained_net(family, "c3lier")
    assert net.file_names == {}
    assert "lora_unet_up_blocks_1_upsamplers_0_conv.alpha" in net.state_dict_kohya()


def _perturbed(net, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("ntype", ["c3lier", "lokr"])
def test_sdxl_files_of_both_layouts_resume(tmp_path, ntype: str) -> None:
    """Files from before the change (diffusers names) and after (original layout) load alike."""
    _, net = trained_net("sdxl", ntype)
    _perturbed(net, 3)
    want = {k: v.clone() for k, v in net.lyco.state_dict().items()}
    new = net.save(tmp_path / "new.safetensors", dtype=torch.float32, metadata={})
    renames, net.file_names = net.file_names, {}
    old = net.save(tmp_path / "old.safetensors", dtype=torch.float32, metadata={})
    net.file_names = renames
    assert any(k.startswith("lora_unet_up_blocks_") for k in load_file(str(old)))
    for path in (new, old):
        _, fresh = trained_net("sdxl", ntype)
        fresh.load_weights(path)
        got = fresh.lyco.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), path.name
