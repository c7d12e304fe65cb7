"""DoRA files and the consumers that read them.

The magnitude vector has an axis. A1111 1.10 applies it per input channel only; Forge and
ComfyUI tell the axis from its shape; LyCORIS's own loader
(``lycoris.kohya.create_network_from_weights``, what sd-scripts calls) builds per-output
modules only. The default file is per input channel (every WebUI); with
``network_dora_on_output`` it is per output channel and LyCORIS's loader gives the trained
delta. Each merge below is written from the consumer's behaviour, not its code.

LyCORIS's loader first constructs an empty network by walking the U-Net with its class
preset, whose default crashes on diffusers U-Nets ("duplicated lora name"; sd-scripts
passes its own U-Net classes). The tests set a preset for that walk only: the loader
then discards what the walk found and builds every module from the file.
"""
from __future__ import annotations

import json

import pytest
import torch
from lycoris.kohya import create_network_from_weights
from safetensors.torch import load_file

from tests.test_lora_roundtrip import assert_close, kohya_modules, outputs
from tests.tiny import tiny_bundle
from trainer.config.schema import TrainConfig
from trainer.networks.metadata import network_args
from trainer.networks.build import NetworkSpec, _lycoris_preset, _preset_for, text_encoder_root
from trainer.networks.network import Network


def trained(ntype: str, on_output: bool) -> tuple:
    bundle = tiny_bundle("sd1")
    cfg = TrainConfig(network_type=ntype, network_dora=True, network_dora_on_output=on_output, network_rank=4,
                      network_alpha=2.0, network_conv_rank=2, network_conv_alpha=1.0, save_lora_name="d",
                      train_textencoder_learning_rate=1e-5)
    net = Network.build(bundle, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move the magnitudes too, not only the low-rank factors
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return bundle, net, cfg


def axis_merge(bundle, sd: dict[str, torch.Tensor]) -> None:
    """Forge's and ComfyUI's rule: the magnitude's shape says which axis it normalises."""
    mods = kohya_modules(bundle)
    for name in {k.split(".", 1)[0] for k in sd}:
        t = {k.split(".", 1)[1]: v.double() for k, v in sd.items() if k.startswith(name + ".")}
        weight = mods[name].weight
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        merged = weight.double() + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * t["alpha"] / down.shape[0]
        scale = t["dora_scale"]
        if scale.shape[0] == weight.shape[0] and weight.shape[0] != 1:  # per output channel
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(scale.shape)
        else:
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(
                merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
        with torch.no_grad():
            weight.copy_((merged * (scale / norm)).to(weight.dtype))


@pytest.mark.parametrize("ntype", ["lierla", "c3lier"])
def test_lycoris_loader_gives_the_trained_delta_of_an_output_axis_file(tmp_path, ntype: str) -> None:
    base = outputs(tiny_bundle("sd1"))
    bundle, net, cfg = trained(ntype, on_output=True)
    want = outputs(bundle)
    path = net.save(tmp_path / "d.safetensors", dtype=torch.float32, metadata={})
    fresh = tiny_bundle("sd1")
    te = text_encoder_root(fresh.text_encoders[0])
    with _lycoris_preset(_preset_for(fresh, NetworkSpec.from_config(cfg))):
        loaded, weights = create_network_from_weights(1.0, str(path), None, te, fresh.unet)
        loaded.apply_to(te, fresh.unet, apply_text_encoder=True, apply_unet=True)
    assert len(loaded.unet_loras) + len(loaded.text_encoder_loras) == len(net.module_names())
    assert_close(outputs(fresh), want, base)


def test_lycoris_loader_refuses_an_input_axis_file(tmp_path) -> None:
    """Why the option exists: LyCORIS 4.1.3 builds per-output magnitudes whatever the file holds."""
    _, net, cfg = trained("lierla", on_output=False)
    path = net.save(tmp_path / "d.safetensors", dtype=torch.float32, metadata={})
    fresh = tiny_bundle("sd1")
    with _lycoris_preset(_preset_for(fresh, NetworkSpec.from_config(cfg))), pytest.raises(RuntimeError, match="shape"):
        create_network_from_weights(1.0, str(path), None, text_encoder_root(fresh.text_encoders[0]), fresh.unet)


@pytest.mark.parametrize("on_output", [False, True])
@pytest.mark.parametrize("ntype", ["lierla", "c3lier"])
def test_forge_and_comfyui_read_either_axis(tmp_path, ntype: str, on_output: bool) -> None:
    base = outputs(tiny_bundle("sd1"))
    bundle, net, cfg = trained(ntype, on_output)
    want = outputs(bundle)
    sd = load_file(str(net.save(tmp_path / "d.safetensors", dtype=torch.float32, metadata={})))
    linear = next(v for k, v in sd.items() if k.endswith("to_q.dora_scale"))
    assert linear.shape[0 if on_output else 1] > 1 and linear.shape[1 if on_output else 0] == 1
    fresh = tiny_bundle("sd1")
    axis_merge(fresh, sd)
    assert_close(outputs(fresh), want, base)
    assert network_args(cfg)["wd_on_output"] == str(on_output)
    assert json.loads(json.dumps(network_args(cfg)))["dora_wd"] == "True"
