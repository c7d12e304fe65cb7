"""SD3 LoRA files: sd-scripts' SAI key names for the joint blocks, the round trip file -> network ->
file, and the transformer output of diffusers' own LoRA loading equal to the in-memory network."""
from __future__ import annotations

import pytest
import torch

from trainer.families.sd3_keys import from_file, to_diffusers, to_file

from tests.flux_tiny import flux_lycoris
from tests.sd3_tiny import sd3_forward, tiny_sd3_parts


def sd3_lycoris(model, *, algo: str = "lora", rank: int = 4):
    """A LyCORIS network on SD3's JointTransformerBlock, applied, its weights random."""
    return flux_lycoris(model, algo=algo, rank=rank, blocks=("JointTransformerBlock",))


def expected_names(blocks: int, dual: tuple[int, ...]) -> set[str]:
    """sd-scripts' lora_sd3.py names: lora_unet_ + the SAI module path, '.' -> '_' (the last block's
    context side is pre-only: no attn proj and no MLP)."""
    names = set()
    for i in range(blocks):
        sides = {"x_block": ["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"],
                 "context_block": ["attn_qkv", "adaLN_modulation_1"] if i == blocks - 1 else
                 ["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"]}
        if i in dual:
            sides["x_block"] += ["attn2_qkv", "attn2_proj"]
        names |= {f"lora_unet_joint_blocks_{i}_{side}_{layer}" for side, layers in sides.items() for layer in layers}
    return names


@pytest.mark.parametrize("variant,dual", [("5-medium", (0,)), ("5-large", ())])
def test_the_file_names_are_sd_scripts_names_and_round_trip(variant, dual):
    model = tiny_sd3_parts(variant, t5=False)["transformer"]
    net = sd3_lycoris(model)
    memory = net.state_dict()
    written = to_file(memory)
    assert {k.split(".")[0] for k in written} == expected_names(3, dual)
    back = from_file(written, {k: v.shape for k, v in memory.items()})
    assert set(back) == set(memory) and all(torch.equal(back[k], memory[k]) for k in memory)
    assert to_file(back).keys() == written.keys()


def test_the_last_context_modulation_is_written_as_sai_orders_it():
    """SAI's pre-only modulation is [shift, scale]; diffusers' [scale, shift]: the up rows swap."""
    model = tiny_sd3_parts("5-large", t5=False)["transformer"]
    memory = sd3_lycoris(model).state_dict()
    up = memory["lora_unet_transformer_blocks_2_norm1_context_linear.lora_up.weight"]
    written = to_file(memory)["lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.lora_up.weight"]
    half = up.shape[0] // 2
    assert torch.equal(written[:half], up[half:]) and torch.equal(written[half:], up[:half])


def _merged_by_hand(model, peft_sd: dict[str, torch.Tensor]) -> None:
    """W += B @ A for every transformer layer of a diffusers PEFT state dict."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, down in peft_sd.items():
            if key.endswith(".lora_A.weight") and key.startswith("transformer."):
                path = key[len("transformer."):-len(".lora_A.weight")]
                up = peft_sd[key.replace("lora_A", "lora_B")]
                modules[path].weight += up @ down


@pytest.mark.parametrize("variant", ["5-medium", "5-large"])
def test_the_diffusers_state_dict_merged_by_hand_gives_the_networks_output(variant):
    from diffusers import StableDiffusion3Pipeline

    parts = tiny_sd3_parts(variant, t5=False)
    net = sd3_lycoris(parts["transformer"])
    want = sd3_forward(parts["transformer"])
    peft_sd = StableDiffusion3Pipeline.lora_state_dict(to_diffusers(to_file(net.state_dict())))
    plain = tiny_sd3_parts(variant, t5=False)["transformer"]
    before = sd3_forward(plain)
    _merged_by_hand(plain, peft_sd)
    got = sd3_forward(plain)
    assert (want - before).abs().max() > 1e-2  # the network changes the output
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@pytest.mark.needs_peft
@pytest.mark.parametrize("variant", ["5-medium", "5-large"])
def test_the_file_loads_in_diffusers_sd3_pipeline_with_the_networks_output(tmp_path, variant):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    from trainer.families.sd3_load import sd3_scheduler
    from trainer.families.tokenizer import clip_tokenizer

    parts = tiny_sd3_parts(variant, t5=False)
    net = sd3_lycoris(parts["transformer"])
    want = sd3_forward(parts["transformer"])
    save_file(to_diffusers(to_file(net.state_dict())), str(tmp_path / "lora.safetensors"))
    fresh = tiny_sd3_parts(variant, t5=False)
    pipe = StableDiffusion3Pipeline(transformer=fresh["transformer"], scheduler=sd3_scheduler(), vae=fresh["vae"],
                                    text_encoder=fresh["clip_l"], tokenizer=clip_tokenizer(),
                                    text_encoder_2=fresh["clip_g"], tokenizer_2=clip_tokenizer("!"),
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    got = sd3_forward(pipe.transformer)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@pytest.mark.needs_peft
def test_a_trained_file_with_text_encoders_loads_in_diffusers_with_the_networks_outputs(tmp_path, logs):
    """The engine's file (transformer, CLIP-L and CLIP-G LoRAs), as to_diffusers gives it to
    load_lora_weights: prompts and transformer output equal those of the network in memory."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file, save_file

    from trainer.training.engine import Trainer

    from tests.enginekit import MemoryHost
    from tests.modekit import loaded, mode_job, write_pair
    from tests.sd3_tiny import tiny_sd3_bundle

    write_pair(tmp_path / "pair", target_suffix="_t")
    cfg = mode_job(tmp_path, "LoRA", lora_data_directory=str(tmp_path / "pair"), diff_target_name="_t",
                   train_iterations=3, train_learning_rate=1e-2, network_blocks=["BASE", "IN01"],
                   t5xxl_max_token_length=8, train_snr_gamma=0.0)
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle(t5=False)), device="cpu").run()
    assert result.status == "done"
    save_file(to_diffusers(load_file(str(result.output))), str(tmp_path / "diffusers_lora.safetensors"))

    def outputs(bundle):
        family = bundle.family
        pipe = family.pipeline(bundle, family.sampling_scheduler(bundle.noise_scheduler, "euler"))
        return pipe, lambda: (pipe.encode_prompt("a photo of a cat", None, None, do_classifier_free_guidance=False,
                                                 max_sequence_length=77)[0], sd3_forward(bundle.unet))

    plain_pipe, plain = outputs(tiny_sd3_bundle(t5=False))
    base_embeds, base_out = plain()
    mem = tiny_sd3_bundle(t5=False)
    with loaded(mem, cfg, result.output):
        want_embeds, want_out = outputs(mem)[1]()
    plain_pipe.load_lora_weights(str(tmp_path), weight_name="diffusers_lora.safetensors")
    got_embeds, got_out = plain()
    assert (want_embeds - base_embeds).abs().max() > 1e-3 and (want_out - base_out).abs().max() > 1e-3
    assert torch.allclose(got_embeds, want_embeds, atol=1e-4, rtol=0), (got_embeds - want_embeds).abs().max()
    assert torch.allclose(got_out, want_out, atol=1e-4, rtol=0), (got_out - want_out).abs().max()
