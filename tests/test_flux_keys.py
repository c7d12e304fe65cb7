"""FLUX.1 LoRA file layout (trainer/families/flux_keys.py) on a tiny FluxTransformer2DModel.

Expected names are written out from sd-scripts' documented pattern (networks/lora_flux.py) and
from ComfyUI's/Forge's ``flux_to_diffusers`` table, not computed by the module under test.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from lycoris.kohya import LycorisNetworkKohya

from trainer.families.flux_keys import from_file, to_file

from tests.flux_tiny import flux_lycoris

D, MLP, DOUBLE, SINGLE = 32, 128, 2, 2  # hidden width (2 heads x 16), MLP width, blocks
LORA = ("lora_down.weight", "lora_up.weight", "alpha")
DOUBLE_FILE = ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
               "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")
SINGLE_FILE = ("linear1", "linear2", "modulation_lin")
# diffusers module -> (BFL module, first row, rows); rows None = the whole weight. As ComfyUI's
# and Forge's flux_to_diffusers lay q, k, v (and the single blocks' MLP) into BFL's weights.
_DOUBLE_MAP = {
    "attn.to_q": ("img_attn.qkv", 0, D), "attn.to_k": ("img_attn.qkv", D, D), "attn.to_v": ("img_attn.qkv", 2 * D, D),
    "attn.add_q_proj": ("txt_attn.qkv", 0, D), "attn.add_k_proj": ("txt_attn.qkv", D, D),
    "attn.add_v_proj": ("txt_attn.qkv", 2 * D, D), "attn.to_out.0": ("img_attn.proj", 0, None),
    "attn.to_add_out": ("txt_attn.proj", 0, None), "ff.net.0.proj": ("img_mlp.0", 0, None),
    "ff.net.2": ("img_mlp.2", 0, None), "ff_context.net.0.proj": ("txt_mlp.0", 0, None),
    "ff_context.net.2": ("txt_mlp.2", 0, None), "norm1.linear": ("img_mod.lin", 0, None),
    "norm1_context.linear": ("txt_mod.lin", 0, None),
}
_SINGLE_MAP = {
    "attn.to_q": ("linear1", 0, D), "attn.to_k": ("linear1", D, D), "attn.to_v": ("linear1", 2 * D, D),
    "proj_mlp": ("linear1", 3 * D, MLP), "proj_out": ("linear2", 0, None), "norm.linear": ("modulation.lin", 0, None),
}
TOP_MAP = {
    "x_embedder": ("img_in", 0, None), "context_embedder": ("txt_in", 0, None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0, None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0, None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", 0, None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", 0, None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0, None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0, None),
    "proj_out": ("final_layer.linear", 0, None), "norm_out.linear": ("final_layer.adaLN_modulation.1", 0, None),
}
BFL_OF = {**{f"transformer_blocks.{i}.{k}": (f"double_blocks.{i}.{b}", o, n)
             for i in range(DOUBLE) for k, (b, o, n) in _DOUBLE_MAP.items()},
          **{f"single_transformer_blocks.{i}.{k}": (f"single_blocks.{i}.{b}", o, n)
             for i in range(SINGLE) for k, (b, o, n) in _SINGLE_MAP.items()}, **TOP_MAP}
SINGLE_QKV_MLP = {f"single_transformer_blocks.{i}.{k}" for i in range(SINGLE)
                  for k in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6)).eval()


def flux_inputs(seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(2, 7, 24, generator=g),
            "pooled_projections": torch.randn(2, 20, generator=g), "timestep": torch.tensor([0.3, 0.8]),
            "guidance": torch.tensor([1.0, 3.5]), "img_ids": torch.rand(16, 3, generator=g) * 4,
            "txt_ids": torch.zeros(7, 3), "return_dict": False}


def lycoris_sd(model: torch.nn.Module, algo: str = "lora", dora: bool = False, rank: int = 4,
               alpha: float = 2.0) -> tuple[LycorisNetworkKohya, dict[str, torch.Tensor]]:
    """A LyCORIS network on both FLUX block classes (applied to `model`), weights made random."""
    net = flux_lycoris(model, algo=algo, rank=rank, alpha=alpha, dora=dora)
    return net, {k: v.detach().clone() for k, v in net.state_dict().items()}


def random_lora(shapes: dict[str, tuple[int, int]], ranks: dict[str, int] | None = None,
                alphas: dict[str, float] | None = None, seed: int = 7) -> dict[str, torch.Tensor]:
    """In-memory LoRA keys (``lora_unet_<path>``) for diffusers Linear paths -> (out, in)."""
    gen, sd = torch.Generator().manual_seed(seed), {}
    for path, (out, inp) in shapes.items():
        name, r = "lora_unet_" + path.replace(".", "_"), (ranks or {}).get(path, 4)
        sd[f"{name}.lora_down.weight"] = torch.randn(r, inp, generator=gen) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(out, r, generator=gen) * 0.3
        sd[f"{name}.alpha"] = torch.tensor((alphas or {}).get(path, 2.0))
    return sd


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_delta(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """up @ down * alpha / rank, the scale every consumer applies (rank = the down's rows)."""
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    return up @ down * float(sd[f"{name}.alpha"]) / down.shape[0]


def merged(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` with each {diffusers path: delta} added to that Linear's weight."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for path, delta in deltas.items():
            modules[path].weight += delta.to(modules[path].weight.dtype)
    return out


def memory_deltas(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    by_name = {"lora_unet_" + p.replace(".", "_"): p for p in linear_shapes(model)}
    return {by_name[k.split(".")[0]]: lora_delta(sd, k.split(".")[0]) for k in sd if k.endswith(".lora_down.weight")}


def test_lora_on_all_block_linears_gets_sd_scripts_names():
    _, sd = lycoris_sd(tiny_flux())
    expected = {f"lora_unet_double_blocks_{i}_{m}.{t}" for i in range(DOUBLE) for m in DOUBLE_FILE for t in LORA}
    expected |= {f"lora_unet_single_blocks_{i}_{m}.{t}" for i in range(SINGLE) for m in SINGLE_FILE for t in LORA}
    assert len(sd) == 3 * (14 * DOUBLE + 6 * SINGLE)  # every Linear of both block classes
    assert set(to_file(sd)) == expected


def _bfl_deltas(sd: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """{BFL weight: expected delta}, the diffusers deltas laid into BFL rows (zeros where no LoRA)."""
    out: dict[str, torch.Tensor] = {}
    for path, delta in memory_deltas(sd, tiny_flux()).items():
        bfl, first, rows = BFL_OF[path]
        if rows is None:
            out[bfl] = torch.cat([delta[delta.shape[0] // 2:], delta[:delta.shape[0] // 2]]) \
                if bfl == "final_layer.adaLN_modulation.1" else delta
            continue
        total = 3 * D + (MLP if bfl.endswith("linear1") else 0)
        out.setdefault(bfl, torch.zeros(total, shapes[path][1], dtype=delta.dtype))[first:first + rows] = delta
    return out


def test_fused_file_gives_each_modules_delta_exactly():
    """Applied as ComfyUI/Forge apply it (up @ down * alpha / down rows on the BFL weight): the
    deltas of all in-memory modules, parts with different ranks and alphas, one part missing."""
    shapes = linear_shapes(tiny_flux())
    del shapes["transformer_blocks.1.attn.add_v_proj"]  # no LoRA on this part: zero rows in the file
    ranks = {"transformer_blocks.0.attn.to_k": 2, "single_transformer_blocks.0.proj_mlp": 8}
    alphas = {"transformer_blocks.0.attn.to_v": 1.0, "single_transformer_blocks.1.attn.to_q": 0.5}
    sd = random_lora(shapes, ranks, alphas)
    file = to_file(sd)
    want = _bfl_deltas(sd, shapes)
    got = {k[len("lora_unet_"):-len(".alpha")]: lora_delta(file, k[:-len(".alpha")]) for k in file if k.endswith(".alpha")}
    assert len(got) == len(want) == 10 * DOUBLE + 3 * SINGLE + len(TOP_MAP)
    for bfl, delta in want.items():
        torch.testing.assert_close(got[bfl.replace(".", "_")], delta, rtol=1e-12, atol=1e-12)


def test_uniform_scales_keep_the_tensors_and_scale_alpha_by_parts():
    shapes = {f"transformer_blocks.0.attn.{p}": (D, D) for p in ("to_q", "to_k", "to_v")}
    sd = random_lora(shapes)
    file = to_file(sd)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert file[f"{name}.lora_down.weight"].shape == (12, D) and float(file[f"{name}.alpha"]) == 6.0
    up = file[f"{name}.lora_up.weight"]
    for j, p in enumerate(("to_q", "to_k", "to_v")):
        block = up[j * D:(j + 1) * D]
        assert torch.equal(block[:, 4 * j:4 * j + 4], sd[f"lora_unet_transformer_blocks_0_attn_{p}.lora_up.weight"])
        assert not block[:, :4 * j].any() and not block[:, 4 * j + 4:].any()


@pytest.mark.parametrize("algo,dora", [("lora", False), ("lora", True), ("lokr", False), ("loha", False)])
def test_round_trip_is_exact(algo, dora):
    _, sd = lycoris_sd(tiny_flux(), algo, dora)
    gen = torch.Generator().manual_seed(9)
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (8, 8), "lora_te2_encoder_block_0_layer_0_SelfAttention_q": (8, 8)}
    for name, (out, inp) in te.items():
        sd |= {f"{name}.lora_down.weight": torch.randn(4, inp, generator=gen),
               f"{name}.lora_up.weight": torch.randn(out, 4, generator=gen), f"{name}.alpha": torch.tensor(3.0)}
    file = to_file(sd)
    assert {k.split(".")[0] for k in file if k.startswith("lora_te")} == {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"}
    for target in (None, {k: tuple(v.shape) for k, v in sd.items()}):
        back = from_file(file, target)
        assert set(back) == set(sd)
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@pytest.mark.parametrize("algo,dora", [("lora", True), ("lokr", False), ("loha", False)])
def test_unfused_algorithms_use_names_comfyui_and_forge_map(algo, dora):
    """ComfyUI/Forge map ``lora_transformer_<diffusers path>`` onto BFL weights with offsets."""
    _, sd = lycoris_sd(tiny_flux(), algo, dora)
    file = to_file(sd)
    expected = {"lora_transformer_" + p.replace(".", "_") for p in BFL_OF if p.startswith(("transformer_", "single_"))}
    assert {k.split(".")[0] for k in file} == expected
    for k, v in sd.items():
        assert torch.equal(file["lora_transformer_" + k[len("lora_unet_"):]], v)


def test_sd_scripts_dense_qkv_is_read_with_a_shared_down():
    """A file trained without split_qkv: one rank-R LoRA on the fused weight."""
    gen = torch.Generator().manual_seed(2)
    file = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(6, D, generator=gen),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * D, 6, generator=gen),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(3.0),
            "lora_unet_single_blocks_1_linear1.lora_down.weight": torch.randn(4, D, generator=gen),
            "lora_unet_single_blocks_1_linear1.lora_up.weight": torch.randn(3 * D + MLP, 4, generator=gen),
            "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(4.0)}
    back = from_file(file)
    for bfl, parts in (("double_blocks_0_img_attn_qkv", [f"transformer_blocks_0_attn_to_{p}" for p in "qkv"]),
                       ("single_blocks_1_linear1", [f"single_transformer_blocks_1_attn_to_{p}" for p in "qkv"]
                        + ["single_transformer_blocks_1_proj_mlp"])):
        whole = torch.cat([lora_delta(back, "lora_unet_" + p) for p in parts])
        torch.testing.assert_close(whole, lora_delta(file, "lora_unet_" + bfl), rtol=1e-12, atol=1e-12)
        assert all(back[f"lora_unet_{p}.lora_down.weight"].shape[0] == file[f"lora_unet_{bfl}.lora_down.weight"].shape[0]
                   for p in parts)


def test_unequal_ranks_follow_the_networks_shapes():
    shapes = {f"single_transformer_blocks.0.attn.to_{p}": (D, D) for p in "qkv"} | {"single_transformer_blocks.0.proj_mlp": (MLP, D)}
    ranks = {"single_transformer_blocks.0.attn.to_q": 2, "single_transformer_blocks.0.attn.to_k": 3,
             "single_transformer_blocks.0.attn.to_v": 4, "single_transformer_blocks.0.proj_mlp": 5}
    alphas = {"single_transformer_blocks.0.attn.to_k": 1.5, "single_transformer_blocks.0.proj_mlp": 8.0}
    sd = random_lora(shapes, ranks, alphas)
    target = {k: tuple(v.shape) for k, v in sd.items()}
    back = from_file(to_file(sd), target)
    assert {k: tuple(v.shape) for k, v in back.items()} == target
    for name in {k.split(".")[0] for k in sd}:
        torch.testing.assert_close(lora_delta(back, name), lora_delta(sd, name), rtol=1e-6, atol=1e-7)
    wrong = dict(target, **{"lora_unet_single_transformer_blocks_0_attn_to_q.lora_down.weight": (3, D)})
    with pytest.raises(ValueError, match="single_blocks_0_linear1.*cannot be split"):
        from_file(to_file(sd), wrong)


def test_bad_names_and_algorithms_are_refused():
    with pytest.raises(ValueError, match="lora_unet_transformer_blocks_0_attn_norm_q: no FLUX"):
        to_file(random_lora({"transformer_blocks.0.attn.norm_q": (16, 16)}))
    with pytest.raises(ValueError, match="lora_unet_double_blocks_0_img_attn_qkv: a fused FLUX module.*plain LoRA"):
        from_file({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.ones(2, 2),
                   "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.ones(48, 16)})
    with pytest.raises(ValueError, match="lora_unet_double_blocks_9_img_attn_qkvx: not a FLUX.1"):
        from_file({"lora_unet_double_blocks_9_img_attn_qkvx.alpha": torch.tensor(1.0)})


def _without_single_linear1(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers splits linear1 only at FLUX.1's widths (3072 x 3 + 12288): leave it out here."""
    names = {"lora_unet_" + p.replace(".", "_") for p in SINGLE_QKV_MLP}
    return {k: v for k, v in sd.items() if k.split(".")[0] not in names}


def share_downs_of(net, sd: dict[str, torch.Tensor]) -> None:
    """Give the parts of each fused layer the first part's down, in `net` and in `sd` (split_qkv off)."""
    from trainer.families.flux_net import fused_groups

    modules = {m.lora_name: m for m in net.loras}
    with torch.no_grad():
        for names in fused_groups(modules):
            for name in names[1:]:
                sd[f"{name}.lora_down.weight"] = sd[f"{names[0]}.lora_down.weight"].clone()
                modules[name].lora_down.weight.copy_(sd[f"{name}.lora_down.weight"])


@pytest.mark.parametrize("shared", [False, True])
def test_diffusers_reads_the_file_as_the_network_applies_it(shared):
    """diffusers' own kohya-FLUX conversion (FluxPipeline.lora_state_dict, no peft needed), merged
    by hand, gives the output of the LyCORIS network applied in memory and of W + up @ down * scale;
    with parts that share a down (split_qkv off) the file is sd-scripts' one LoRA per fused layer."""
    base = tiny_flux()
    applied = copy.deepcopy(base)
    net, sd = lycoris_sd(applied)
    if shared:
        share_downs_of(net, sd)
    left_out = {"lora_unet_" + p.replace(".", "_") for p in SINGLE_QKV_MLP}
    with torch.no_grad():
        for module in net.loras:
            if module.lora_name in left_out:
                module.lora_up.weight.zero_()
        in_memory = applied(**flux_inputs())[0]
    sd = _without_single_linear1(sd)
    file = to_file(sd)
    assert file["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape[0] == (4 if shared else 12)
    converted = FluxPipeline.lora_state_dict(file)
    deltas = {k[len("transformer."):-len(".lora_A.weight")]: converted[k.replace("lora_A", "lora_B")].double()
              @ converted[k].double() for k in converted if k.endswith(".lora_A.weight")}
    assert set(deltas) == set(memory_deltas(sd, base))
    with torch.no_grad():
        want = merged(base, memory_deltas(sd, base))(**flux_inputs())[0]
        got = merged(base, deltas)(**flux_inputs())[0]
        plain = base(**flux_inputs())[0]
    assert (in_memory - want).abs().max() <= 1e-4
    assert (got - want).abs().max() <= 1e-4
    assert (want - plain).abs().max() > 1e-2  # the LoRA changes the output


@pytest.mark.needs_peft
@pytest.mark.parametrize("shared", [False, True])
def test_flux_pipeline_load_lora_weights_gives_the_network_output(shared):
    """The file through FluxPipeline.load_lora_weights (peft) on the tiny transformer, with parts
    apart (split_qkv) or sharing a down (sd-scripts' default)."""
    base = tiny_flux()
    net, sd = lycoris_sd(copy.deepcopy(base), rank=3, alpha=4.0)
    if shared:
        share_downs_of(net, sd)
    sd = _without_single_linear1(sd)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=copy.deepcopy(base))
    pipe.load_lora_weights(to_file(sd))
    with torch.no_grad():
        got = pipe.transformer(**flux_inputs())[0]
        want = merged(base, memory_deltas(sd, base))(**flux_inputs())[0]
        plain = base(**flux_inputs())[0]
    assert (got - want).abs().max() <= 1e-4
    assert (want - plain).abs().max() > 1e-2


def test_a_single_encoder_network_keeps_its_prefix_on_load():
    """One encoder in the network gives ``lora_te_``; the file says ``lora_te1_`` (CLIP-L) either way."""
    sd = {"lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": torch.ones(2, 8),
          "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": torch.ones(16, 2),
          "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha": torch.tensor(1.0)}
    file = to_file(sd)
    assert set(file) == {k.replace("lora_te_", "lora_te1_") for k in sd}
    assert set(from_file(file, {k: tuple(v.shape) for k, v in sd.items()})) == set(sd)
    assert set(from_file(file)) == set(file)  # without the network: the two-encoder prefix
