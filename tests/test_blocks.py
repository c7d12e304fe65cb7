"""TrainTrain block IDs of diffusers U-Net paths (trainer/families/blocks.py)."""
from __future__ import annotations

import pytest

from tests.tiny import tiny_unet
from trainer.families.blocks import block_id, family_block_ids, unet_selector
from trainer.config.params import ConfigError

# ldm input_blocks / middle_block / output_blocks indices, written out by hand.
SD1_CASES = [
    ("conv_in", "IN00"),
    ("down_blocks.0.resnets.0.conv1", "IN01"),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "IN01"),
    ("down_blocks.0.attentions.1.proj_in", "IN02"),
    ("down_blocks.0.resnets.1", "IN02"),
    ("down_blocks.0.downsamplers.0.conv", "IN03"),
    ("down_blocks.1.resnets.0.time_emb_proj", "IN04"),
    ("down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2", "IN05"),
    ("down_blocks.1.downsamplers.0.conv", "IN06"),
    ("down_blocks.2.attentions.0", "IN07"),
    ("down_blocks.2.resnets.1.conv_shortcut", "IN08"),
    ("down_blocks.2.downsamplers.0.conv", "IN09"),
    ("down_blocks.3.resnets.0.conv2", "IN10"),
    ("down_blocks.3.resnets.1", "IN11"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "M00"),
    ("mid_block.resnets.1.conv1", "M00"),
    ("up_blocks.0.resnets.0.conv1", "OUT00"),
    ("up_blocks.0.resnets.1", "OUT01"),
    ("up_blocks.0.resnets.2.conv2", "OUT02"),
    ("up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("up_blocks.1.attentions.0.proj_out", "OUT03"),
    ("up_blocks.1.resnets.1", "OUT04"),
    ("up_blocks.1.upsamplers.0.conv", "OUT05"),
    ("up_blocks.2.attentions.0", "OUT06"),
    ("up_blocks.2.upsamplers.0.conv", "OUT08"),
    ("up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_out.0", "OUT09"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v", "OUT11"),
    ("up_blocks.3.resnets.2", "OUT11"),
    # in no single block, or not in this family
    ("time_embedding.linear_1", None),
    ("conv_out", None),
    ("conv_norm_out", None),
    ("down_blocks.1", None),
    ("down_blocks", None),
    ("down_blocks.3.downsamplers.0.conv", None),
    ("up_blocks.3.upsamplers.0.conv", None),
    ("down_blocks.4.resnets.0", None),
]

SDXL_CASES = [
    ("conv_in", "IN00"),
    ("down_blocks.0.resnets.0.conv1", "IN01"),
    ("down_blocks.0.resnets.1", "IN02"),
    ("down_blocks.0.downsamplers.0.conv", "IN03"),
    ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_q", "IN04"),
    ("down_blocks.1.resnets.1", "IN05"),
    ("down_blocks.1.downsamplers.0.conv", "IN06"),
    ("down_blocks.2.attentions.0", "IN07"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj", "IN08"),
    ("mid_block.attentions.0.transformer_blocks.3.attn1.to_k", "M00"),
    ("up_blocks.0.attentions.0.proj_in", "OUT00"),
    ("up_blocks.0.resnets.2", "OUT02"),
    ("up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("up_blocks.1.attentions.1", "OUT04"),
    ("up_blocks.1.upsamplers.0.conv", "OUT05"),
    ("up_blocks.2.resnets.0.conv1", "OUT06"),
    ("up_blocks.2.resnets.2.conv_shortcut", "OUT08"),
    # SDXL has 3 levels: no level 3, no downsampler at level 2, no upsampler at up level 2
    ("down_blocks.2.downsamplers.0.conv", None),
    ("down_blocks.3.resnets.0", None),
    ("up_blocks.3.resnets.0", None),
    ("up_blocks.2.upsamplers.0.conv", None),
    ("add_embedding.linear_1", None),
]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("name,expected", SD1_CASES)
def test_sd1_sd2_block_ids(family: str, name: str, expected: str | None) -> None:
    assert block_id(family, name) == expected


@pytest.mark.parametrize("name,expected", SDXL_CASES)
def test_sdxl_block_ids(name: str, expected: str | None) -> None:
    assert block_id("sdxl", name) == expected


def test_family_id_lists() -> None:
    sd1 = family_block_ids("sd1")
    assert sd1[0] == "IN00" and sd1[11] == "IN11" and sd1[12] == "M00" and sd1[-1] == "OUT11"
    assert len(sd1) == 25 and family_block_ids("sd2") == sd1
    sdxl = family_block_ids("sdxl")
    assert sdxl == ("IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00",
                    "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08")


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="family"):
        block_id("sd3", "conv_in")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_real_layouts_cover_every_id(family: str) -> None:
    """Every block container of the real layout maps into the family's IDs, and all IDs
    but IN00 (conv_in is not a block container) are reached."""
    unet = tiny_unet(family)
    kinds = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
    found = {block_id(family, n) for n, m in unet.named_modules() if type(m).__name__ in kinds}
    assert None not in found
    assert found == set(family_block_ids(family)) - {"IN00"}


def test_selector_blocks_and_elements() -> None:
    keep = unet_selector("sd1", ["IN04", "M00"], "CrossAttention")
    assert keep("down_blocks.1.attentions.0")  # container: the walk must reach its layers
    assert keep("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q")
    assert not keep("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert not keep("down_blocks.1.attentions.0.proj_in")
    assert not keep("down_blocks.1.resnets.0.conv1")
    assert not keep("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q")  # IN05 not selected
    assert keep("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0")
    assert not keep("mid_block.resnets.0")
    self_only = unet_selector("sdxl", ["OUT00"], "SelfAttention")
    assert self_only("up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_v")
    assert not self_only("up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_v")
    full = unet_selector("sd1", ["OUT02"], "Full")
    assert full("up_blocks.0.upsamplers.0.conv") and full("up_blocks.0.resnets.2.conv1")
    assert not full("up_blocks.0.resnets.1.conv1")


def test_selector_refuses_unknown_element() -> None:
    with pytest.raises(ConfigError) as err:
        unet_selector("sd1", ["IN01"], "Everything")
    assert err.value.key == "network_element" and err.value.value == "Everything"
