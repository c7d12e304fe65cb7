"""Network building, kohya key names, multiplier, removal, files and metadata (trainer/networks/network.py)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tests.ldm_export import kohya_unet_name, unet_module_paths
from tests.tiny import tiny_bundle
from trainer.families.blocks import block_id, family_block_ids
from trainer.config.schema import TrainConfig
from trainer.networks.metadata import SETTINGS_KEY, build_metadata
from trainer.networks.network import Network
from trainer.config.params import ConfigError

NO_BASE = [b for b in TrainConfig().network_blocks if b != "BASE"]
TE_LAYERS = [f"encoder_layers_{i}_{s}" for i in range(2) for s in (
    "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")]


def make_cfg(**kw) -> TrainConfig:
    base = dict(network_rank=4, network_alpha=2.0, network_conv_rank=2, network_conv_alpha=3.0, save_lora_name="t")
    base.update(kw)
    return TrainConfig(**base)


def unet_layers(unet: nn.Module, with_convs: bool, family: str = "sd1") -> dict[str, nn.Module]:
    """File key -> layer, derived here from the model: Linear and conv layers inside
    Transformer2DModel, plus ResNet/sampler layers when 3x3 convs are trained
    (SDXL keys in the checkpoint layout, through tests/ldm_export's mapping)."""
    kinds = ("Transformer2DModel",) + (("ResnetBlock2D", "Downsample2D", "Upsample2D") if with_convs else ())
    out = {}
    paths = unet_module_paths(unet)
    for cpath, container in unet.named_modules():
        if type(container).__name__ in kinds:
            for sub, m in container.named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    out[kohya_unet_name(family, f"{cpath}.{sub}", paths)] = m
    return out


def path_of(unet: nn.Module) -> dict[str, str]:
    return {"lora_unet_" + n.replace(".", "_"): n for n, _ in unet.named_modules()}


def modules_of(sd: dict) -> set[str]:
    return {k.split(".", 1)[0] for k in sd}


def perturb(net: Network, seed: int = 3, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def unet_out(bundle) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    enc = torch.randn(1, 8, bundle.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if bundle.family.name == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        return bundle.unet(x, torch.tensor([500]), enc, **kw).sample


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("ntype", ["lierla", "c3lier"])
def test_lora_locon_keys_and_shapes(tmp_path, family: str, ntype: str) -> None:
    bundle = tiny_bundle(family)
    net = Network.build(bundle, make_cfg(network_type=ntype), train_text_encoder=False)
    sd = load_file(str(net.save(tmp_path / "n.safetensors", dtype=torch.float16, metadata={})))
    layers = unet_layers(bundle.unet, with_convs=ntype == "c3lier", family=family)
    assert set(sd) == {f"{n}.{s}" for n in layers for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert (ntype == "c3lier") == any(m.kernel_size == (3, 3) for m in layers.values() if isinstance(m, nn.Conv2d))
    for name, m in layers.items():
        down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
        assert down.dtype == torch.float16 and alpha.dtype == torch.float32
        if isinstance(m, nn.Linear):
            assert down.shape == (4, m.in_features) and up.shape == (m.out_features, 4) and alpha.item() == 2.0
        elif m.kernel_size == (1, 1):
            assert down.shape == (4, m.in_channels, 1, 1) and up.shape == (m.out_channels, 4, 1, 1)
            assert alpha.item() == 2.0
        else:
            assert down.shape == (2, m.in_channels, 3, 3) and up.shape == (m.out_channels, 2, 1, 1)
            assert alpha.item() == 3.0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loha_keys_and_shapes(family: str) -> None:
    bundle = tiny_bundle(family)
    sd = Network.build(bundle, make_cfg(network_type="loha"), train_text_encoder=False).state_dict_kohya()
    layers = unet_layers(bundle.unet, with_convs=True, family=family)
    suffixes = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")
    assert set(sd) == {f"{n}.{s}" for n in layers for s in suffixes}
    for name, m in layers.items():
        out_dim, in_flat = m.weight.shape[0], m.weight[0].numel()
        rank = 2 if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) else 4
        for i in (1, 2):
            assert sd[f"{name}.hada_w{i}_a"].shape == (out_dim, rank)
            assert sd[f"{name}.hada_w{i}_b"].shape == (rank, in_flat)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lokr_keys_and_kron_shapes(family: str) -> None:
    bundle = tiny_bundle(family)
    sd = Network.build(bundle, make_cfg(network_type="lokr"), train_text_encoder=False).state_dict_kohya()
    layers = unet_layers(bundle.unet, with_convs=True, family=family)
    assert modules_of(sd) == set(layers)
    halves = 0
    for name, m in layers.items():
        w1 = sd[f"{name}.lokr_w1"]
        if f"{name}.lokr_w2" in sd:
            w2 = sd[f"{name}.lokr_w2"]
            assert f"{name}.lokr_w2_a" not in sd
        else:
            halves += 1
            a, b = sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"]
            rank = 2 if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) else 4
            assert a.shape[1] == rank and b.shape[0] == rank
            w2 = (a @ b).reshape(a.shape[0], -1, *m.weight.shape[2:])
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        assert torch.kron(w1, w2).shape == m.weight.shape
    assert 0 < halves < len(layers)  # both layouts occur on this model


@pytest.mark.parametrize("ntype", ["lierla", "c3lier"])
def test_dora_scale_per_input_channel(ntype: str) -> None:
    bundle = tiny_bundle("sd1")
    sd = Network.build(bundle, make_cfg(network_type=ntype, network_dora=True)).state_dict_kohya()
    layers = unet_layers(bundle.unet, with_convs=ntype == "c3lier")
    assert {n for n in modules_of(sd) if n.startswith("lora_unet")} == set(layers)
    for name, m in layers.items():
        w = m.weight
        expected = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))
        assert torch.allclose(sd[f"{name}.dora_scale"], expected, rtol=1e-5)
    assert all(f"{n}.dora_scale" in sd for n in modules_of(sd))


@pytest.mark.parametrize("family,prefixes", [("sd1", ["lora_te"]), ("sd2", ["lora_te"]),
                                             ("sdxl", ["lora_te1", "lora_te2"])])
def test_text_encoder_keys_fixed_across_transformers(family: str, prefixes: list[str]) -> None:
    net = Network.build(tiny_bundle(family), make_cfg(network_type="lierla"))
    te = {n for n in modules_of(net.state_dict_kohya()) if n.startswith("lora_te")}
    assert te == {f"{p}_text_model_{layer}" for p in prefixes for layer in TE_LAYERS}
    assert len(net.text_encoder_modules) == len(te) and net.trains_text_encoder


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_base_off_means_no_text_encoder(family: str) -> None:
    sd = Network.build(tiny_bundle(family), make_cfg(network_blocks=NO_BASE)).state_dict_kohya()
    assert sd and not any(k.startswith("lora_te") for k in sd)
    assert not Network.build(tiny_bundle(family), make_cfg(network_blocks=NO_BASE)).trains_text_encoder
    forced_off = Network.build(tiny_bundle(family), make_cfg(), train_text_encoder=False).state_dict_kohya()
    assert not any(k.startswith("lora_te") for k in forced_off)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("element,attn", [("CrossAttention", "attn2"), ("SelfAttention", "attn1")])
def test_element_filter(family: str, element: str, attn: str) -> None:
    bundle = tiny_bundle(family)
    sd = Network.build(bundle, make_cfg(network_type="c3lier", network_element=element)).state_dict_kohya()
    names = modules_of(sd)
    assert names and all(n.startswith("lora_unet") for n in names)  # no text encoder with an element
    expected = {n for n in unet_layers(bundle.unet, True, family=family) if f"_{attn}_" in n}
    assert names == expected


@pytest.mark.parametrize("family,blocks", [("sd1", ["IN03", "IN04", "M00", "OUT02", "OUT11"]),
                                          ("sdxl", ["IN01", "IN08", "OUT05", "IN10", "OUT11"])])
def test_block_filter(family: str, blocks: list[str]) -> None:
    bundle = tiny_bundle(family)
    net = Network.build(bundle, make_cfg(network_type="c3lier", network_blocks=blocks))
    paths = path_of(bundle.unet)
    found = {block_id(family, paths[n]) for n in net.module_names()}
    wanted = set(blocks) & set(family_block_ids(family))  # IDs the family lacks are ignored
    assert found == wanted
    all_layers = unet_layers(bundle.unet, True)  # in-memory (diffusers) names, as module_names() gives
    assert set(net.module_names()) == {n for n in all_layers if block_id(family, paths[n]) in wanted}


def test_bad_selections_are_refused_and_lycoris_state_is_kept() -> None:
    from lycoris.kohya import LycorisNetworkKohya

    before = (list(LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE), list(LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME))
    with pytest.raises(ConfigError) as err:
        Network.build(tiny_bundle("sd1"), make_cfg(network_blocks=["IN00"]))  # conv_in is never a target
    assert err.value.key == "network_blocks"
    with pytest.raises(ConfigError) as err:
        Network.build(tiny_bundle("sd1"), make_cfg(network_type="loha", network_dora=True))
    assert err.value.key == "network_dora"
    Network.build(tiny_bundle("sd1"), make_cfg(network_type="lierla"))
    assert (LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME) == before


@pytest.mark.parametrize("ntype,dora", [("lierla", False), ("c3lier", False), ("loha", False), ("lokr", False),
                                        ("lierla", True), ("c3lier", True)])
def test_multiplier_zero_and_remove_give_base_output(ntype: str, dora: bool) -> None:
    bundle = tiny_bundle("sd1")
    base = unet_out(bundle)
    net = Network.build(bundle, make_cfg(network_type=ntype, network_dora=dora))
    perturb(net)
    on = unet_out(bundle)
    assert (on - base).abs().max() > 1e-3
    with net.disabled():
        assert net.multiplier == 0.0
        assert torch.equal(unet_out(bundle), base)
    assert net.multiplier == 1.0 and torch.equal(unet_out(bundle), on)
    net.set_multiplier(0.0)
    assert torch.equal(unet_out(bundle), base)
    net.set_multiplier(1.0)
    assert torch.equal(unet_out(bundle), on)
    net.remove()
    assert torch.equal(unet_out(bundle), base)
    for model in bundle.modules():
        for m in model.modules():
            assert "forward" not in m.__dict__ and not any(k.startswith("_lycoris") for k in m.__dict__)


def test_param_groups_and_precision() -> None:
    net = Network.build(tiny_bundle("sdxl"), make_cfg(train_lora_precision="bf16"))
    groups = net.param_groups(1e-4, 5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("text_encoder", 5e-5)]
    unet_ids = {id(p) for m in net.unet_modules for p in m.parameters()}
    assert {id(p) for p in groups[0]["params"]} == unet_ids
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in net.parameters()}
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    ids = [id(p) for p in net.parameters()]
    assert [id(p) for p in net.to("cpu").parameters()] == ids  # optimizer references stay valid
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    sd = net.state_dict_kohya(torch.float16)
    assert all(v.dtype == (torch.float32 if k.endswith(".alpha") else torch.float16) for k, v in sd.items())
    only_unet = Network.build(tiny_bundle("sd1"), make_cfg(network_blocks=NO_BASE)).param_groups(1e-4, 5e-5)
    assert [g["name"] for g in only_unet] == ["unet"]


def test_save_refuses_overwrite_and_keeps_old_file(tmp_path) -> None:
    net = Network.build(tiny_bundle("sd1"), make_cfg())
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old contents")
    with pytest.raises(FileExistsError, match="save_overwrite"):
        net.save(target, dtype=torch.float16, metadata={})
    assert target.read_bytes() == b"old contents"
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind
    net.save(target, dtype=torch.float16, metadata={"k": "v"}, overwrite=True)
    with safe_open(str(target), framework="pt") as fh:
        assert fh.metadata()["k"] == "v" and len(list(fh.keys())) == len(net.state_dict_kohya())


def _deltas(sd: dict) -> dict[str, torch.Tensor]:
    """Each module's weight delta from its tensors (alpha/rank scale left out: it cancels in ratios)."""
    out = {}
    for name in modules_of(sd):
        t = {k.split(".", 1)[1]: v.float() for k, v in sd.items() if k.startswith(name + ".")}
        if "lora_up.weight" in t:
            out[name] = t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)
        elif "hada_w1_a" in t:
            out[name] = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        else:
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            out[name] = torch.kron(t["lokr_w1"], w2.flatten(1))
    return out


@pytest.mark.parametrize("ntype", ["lierla", "c3lier", "loha", "lokr"])
@pytest.mark.parametrize("strength", [2.0, -0.5])
def test_strength_scales_the_file_delta(tmp_path, ntype: str, strength: float) -> None:
    bundle = tiny_bundle("sd1")
    net = Network.build(bundle, make_cfg(network_type=ntype, network_rank=2))
    perturb(net)
    one = load_file(str(net.save(tmp_path / "a.safetensors", dtype=torch.float32, metadata={})))
    scaled = load_file(str(net.save(tmp_path / "b.safetensors", dtype=torch.float32, metadata={}, strength=strength)))
    d1, ds = _deltas(one), _deltas(scaled)
    assert d1.keys() == ds.keys()
    for name in d1:
        assert torch.allclose(ds[name], strength * d1[name], atol=1e-6, rtol=1e-4), name
    assert all(torch.equal(one[k], scaled[k]) for k in one if k.endswith(".alpha"))
    # resuming from the scaled file gives back the unscaled network
    again = Network.build(tiny_bundle("sd1"), make_cfg(network_type=ntype, network_rank=2))
    again.load_weights(tmp_path / "b.safetensors")
    for k, v in again.state_dict_kohya().items():
        assert torch.allclose(v, one[k], atol=1e-6), k


def test_dora_refuses_strength() -> None:
    net = Network.build(tiny_bundle("sd1"), make_cfg(network_dora=True))
    with pytest.raises(ConfigError) as err:
        net.state_dict_kohya(strength=2.0)
    assert err.value.key == "network_strength" and err.value.value == 2.0


def test_resume_loads_and_refuses_mismatches(tmp_path) -> None:
    cfg = make_cfg(network_type="c3lier")
    net = Network.build(tiny_bundle("sd1"), cfg)
    perturb(net)
    path = net.save(tmp_path / "n.safetensors", dtype=torch.float32, metadata={})
    fresh = Network.build(tiny_bundle("sd1"), cfg)
    fresh.load_weights(path)
    saved = load_file(str(path))
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict_kohya().items())
    cases = [
        (make_cfg(network_type="c3lier", network_rank=8), "shape"),
        (make_cfg(network_type="loha"), "the file is lierla/c3lier, the network is loha"),
        (make_cfg(network_type="lierla"), "unexpected keys"),
        (make_cfg(network_type="c3lier", network_blocks=NO_BASE), "unexpected keys"),
        (make_cfg(network_type="c3lier", network_alpha=4.0), "alpha"),
    ]
    for other, words in cases:
        with pytest.raises(ConfigError) as err:
            Network.build(tiny_bundle("sd1"), other).load_weights(path)
        assert err.value.key == "network_resume" and str(path) in str(err.value) and words in str(err.value)
    with pytest.raises(ConfigError, match="network_resume"):
        fresh.load_weights(tmp_path / "missing.safetensors")


def test_network_args_carry_loraplus_block_weights_and_block_ranks_in_sd_scripts_form() -> None:
    """What shaped the training is in ss_network_args under sd-scripts' names, where tools look for it."""
    cfg = make_cfg(loraplus_lr_ratio=16.0, loraplus_text_encoder_lr_ratio=0.0, down_lr_weight="sine+0.5",
                   mid_lr_weight="0.5", network_block_dims="IN04=8, OUT11=2, BASE=6")
    args = json.loads(build_metadata(cfg, tiny_bundle("sd1"), seed=1, steps=1, started_at=1.7e9, finished_at=None,
                                     num_images=1, tag_frequency={}, resolution=(64, 64),
                                     extra_settings={})["ss_network_args"])
    assert (args["loraplus_lr_ratio"], args["loraplus_text_encoder_lr_ratio"]) == ("16.0", "0.0")
    assert "loraplus_unet_lr_ratio" not in args and "up_lr_weight" not in args  # unset stays out
    assert (args["down_lr_weight"], args["mid_lr_weight"]) == ("sine+0.5", "0.5")
    dims = args["block_dims"].split(",")
    alphas = [float(a) for a in args["block_alphas"].split(",")]
    assert len(dims) == len(alphas) == 25  # IN00-IN11, M00, OUT00-OUT11; BASE is the text encoder's
    assert dims[4] == "8" and dims[24] == "2" and set(dims[:4] + dims[5:24]) == {"4"}
    assert alphas[4] == 4.0 and alphas[24] == 1.0 and alphas[0] == 2.0  # alpha/rank stays 0.5
    plain = json.loads(build_metadata(make_cfg(), tiny_bundle("sd1"), seed=1, steps=1, started_at=1.7e9,
                                      finished_at=None, num_images=1, tag_frequency={}, resolution=(64, 64),
                                      extra_settings={})["ss_network_args"])
    assert plain == {"algo": "lora"}


@pytest.mark.parametrize("ntype,dora,module,arch", [
    ("lierla", False, "networks.lora", "lora"), ("c3lier", False, "networks.lora", "lora"),
    ("loha", False, "lycoris.kohya", "lycoris"), ("lokr", False, "lycoris.kohya", "lycoris"),
    ("lierla", True, "lycoris.kohya", "lycoris")])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_metadata(family: str, ntype: str, dora: bool, module: str, arch: str) -> None:
    cfg = make_cfg(network_type=ntype, network_dora=dora, save_lora_name="mine")
    bundle = tiny_bundle(family)
    meta = build_metadata(cfg, bundle, seed=7, steps=100, started_at=1.7e9, finished_at=1.7e9 + 60, num_images=3,
                          tag_frequency={"imgs": {"cat": 2}}, resolution=(768, 512), extra_settings={"pass": 1})
    keys = ("ss_network_module ss_network_dim ss_network_alpha ss_network_args ss_learning_rate ss_unet_lr "
            "ss_text_encoder_lr ss_max_train_steps ss_lr_scheduler ss_optimizer ss_seed ss_base_model_version "
            "ss_v2 ss_resolution ss_training_started_at ss_training_finished_at ss_output_name ss_tag_frequency "
            "ss_num_train_images ss_mixed_precision ss_min_snr_gamma modelspec.sai_model_spec "
            "modelspec.architecture modelspec.implementation modelspec.title modelspec.date").split()
    assert set(keys) <= set(meta) and all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == module
    assert meta["modelspec.architecture"].endswith("/" + arch)
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["ss_v2"] == str(family == "sd2")
    assert (meta["ss_network_dim"], meta["ss_seed"], meta["ss_steps"]) == ("4", "7", "100")
    assert meta["ss_max_train_steps"] == str(cfg.train_iterations)
    assert meta["ss_resolution"] == "(768, 512)" and meta["modelspec.resolution"] == "768x512"
    assert meta["ss_output_name"] == "mine" and meta["modelspec.title"] == "mine"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == {"lierla": "lora", "c3lier": "locon", "loha": "loha", "lokr": "lokr"}[ntype]
    assert ("conv_dim" in args) == (ntype != "lierla")
    if "conv_dim" in args:
        assert (args["conv_dim"], args["conv_alpha"]) == ("2", "3.0")
    assert json.loads(meta["ss_tag_frequency"]) == {"imgs": {"cat": 2}}
    assert TrainConfig.from_dict(json.loads(meta[SETTINGS_KEY])) == cfg
    assert json.loads(meta["traindeck_extra"]) == {"pass": 1} and meta["ss_training_finished_at"] == "1700000060.0"
    assert meta["ss_text_encoder_lr"] == str(cfg.text_encoder_lr)  # LoRA mode with BASE trains the encoder
    partial = build_metadata(cfg, bundle, seed=1, steps=5, started_at=1.7e9, finished_at=None, num_images=0,
                             tag_frequency={}, resolution=(512, 512), extra_settings={})
    assert "ss_training_finished_at" not in partial and "traindeck_extra" not in partial
