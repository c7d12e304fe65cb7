"""Prompt encoding: A1111 chunking, SDXL concat/pooled, CLIP skip, gradients, time ids."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_bundle
from trainer.families.textenc import Cond, chunk_ids, encode_prompts, sdxl_time_ids

LONG = " ".join(["cat"] * 100)  # "cat" is one token: 100 tokens, two chunks


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=1)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_bundle("sdxl", seed=1)


def _ids(tokenizer, words: int, pad: int) -> torch.Tensor:
    cat = tokenizer("cat", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1
    return torch.tensor([[49406] + cat * words + [49407] + [pad] * (75 - words)])


def test_chunk_ids_layout(sd1, sdxl):
    ids = chunk_ids(sd1.tokenizers[0], [LONG, "cat"])
    assert ids.shape == (2, 2, 77)
    assert torch.equal(ids[0, 0], _ids(sd1.tokenizers[0], 75, 49407)[0])
    assert torch.equal(ids[0, 1], _ids(sd1.tokenizers[0], 25, 49407)[0])
    assert torch.equal(ids[1, 1], chunk_ids(sd1.tokenizers[0], [""])[0, 0])  # padded with the empty prompt
    assert chunk_ids(sdxl.tokenizers[1], ["cat"])[0, 0, -1].item() == 0  # OpenCLIP pads with "!"


def test_short_prompt_is_last_hidden_state(sd1):
    cond = encode_prompts(sd1, ["cat " * 3])
    assert cond.hidden.shape == (1, 77, 32) and cond.pooled is None
    with torch.no_grad():
        expected = sd1.text_encoders[0](_ids(sd1.tokenizers[0], 3, 49407)).last_hidden_state
    assert torch.allclose(cond.hidden, expected, atol=1e-6)


def test_long_prompt_is_split_into_chunks(sd1):
    cond = encode_prompts(sd1, [LONG])
    assert cond.hidden.shape == (1, 154, 32)
    first = encode_prompts(sd1, [" ".join(["cat"] * 75)]).hidden
    rest = encode_prompts(sd1, [" ".join(["cat"] * 25)]).hidden
    assert torch.allclose(cond.hidden[:, :77], first, atol=1e-6)
    assert torch.allclose(cond.hidden[:, 77:], rest, atol=1e-6)


def test_batch_pads_to_the_longest_prompt(sd1):
    cond = encode_prompts(sd1, [LONG, "a dog"])
    assert cond.hidden.shape == (2, 154, 32)
    assert torch.allclose(cond.hidden[0:1], encode_prompts(sd1, [LONG]).hidden, atol=1e-6)
    assert torch.allclose(cond.hidden[1:, :77], encode_prompts(sd1, ["a dog"]).hidden, atol=1e-6)
    assert torch.allclose(cond.hidden[1:, 77:], encode_prompts(sd1, [""]).hidden, atol=1e-6)


def test_clip_skip_uses_earlier_layer_with_final_norm(sd1):
    te = sd1.text_encoders[0]
    last = encode_prompts(sd1, ["a photo of a cat"], clip_skip=1).hidden
    skipped = encode_prompts(sd1, ["a photo of a cat"], clip_skip=2).hidden
    assert (last - skipped).abs().max() > 1e-3
    ids = chunk_ids(sd1.tokenizers[0], ["a photo of a cat"])[:, 0]
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states[-2]
        norm = getattr(te, "text_model", te).final_layer_norm
        assert torch.allclose(skipped, norm(hidden), atol=1e-6)
    sd1.clip_skip = 2  # the bundle's setting applies when none is passed
    try:
        assert torch.equal(encode_prompts(sd1, ["a photo of a cat"]).hidden, skipped)
    finally:
        sd1.clip_skip = 1


def test_sd2_uses_last_hidden_state():
    sd2 = tiny_bundle("sd2", seed=1)
    ids = chunk_ids(sd2.tokenizers[0], ["a photo"])[:, 0]
    with torch.no_grad():
        expected = sd2.text_encoders[0](ids).last_hidden_state
    assert torch.allclose(encode_prompts(sd2, ["a photo"]).hidden, expected, atol=1e-6)
    assert torch.equal(encode_prompts(sd2, ["a photo"], clip_skip=2).hidden, encode_prompts(sd2, ["a photo"]).hidden)


def test_sdxl_concat_and_pooled(sdxl):
    cond = encode_prompts(sdxl, ["a photo of a cat", LONG])
    assert cond.hidden.shape == (2, 154, 64) and cond.pooled.shape == (2, 32)
    ids = [chunk_ids(tok, ["a photo of a cat"])[:, 0] for tok in sdxl.tokenizers]
    with torch.no_grad():
        out1 = sdxl.text_encoders[0](ids[0], output_hidden_states=True)
        out2 = sdxl.text_encoders[1](ids[1], output_hidden_states=True)
    assert torch.allclose(cond.hidden[:1, :77, :32], out1.hidden_states[-2], atol=1e-6)
    assert torch.allclose(cond.hidden[:1, :77, 32:], out2.hidden_states[-2], atol=1e-6)
    assert torch.allclose(cond.pooled[:1], out2.text_embeds, atol=1e-6)
    first_chunk = encode_prompts(sdxl, [" ".join(["cat"] * 75)])
    assert torch.allclose(cond.pooled[1:], first_chunk.pooled, atol=1e-6)  # pooled from chunk 1 only


def test_grad_keeps_the_graph(sd1):
    te = sd1.text_encoders[0]
    assert not encode_prompts(sd1, ["cat"]).hidden.requires_grad
    te.requires_grad_(True)
    try:
        cond = encode_prompts(sd1, ["cat"], grad=True)
        cond.hidden.sum().backward()
        grad = getattr(te, "text_model", te).embeddings.token_embedding.weight.grad
        assert grad is not None and grad.abs().sum() > 0
        assert not encode_prompts(sd1, ["cat"]).hidden.requires_grad
    finally:
        te.requires_grad_(False).zero_grad(set_to_none=True)


def test_cond_helpers(sdxl):
    cond = encode_prompts(sdxl, ["a", "b"])
    half = cond.to(dtype=torch.bfloat16)
    assert half.hidden.dtype == half.pooled.dtype == torch.bfloat16 and cond.hidden.dtype == torch.float32
    assert len(cond) == 2 and torch.equal(cond[1].hidden, cond.hidden[1:2])
    assert torch.equal(cond[-1].pooled, cond.pooled[1:])
    both = Cond.cat([cond[1], cond[0]])
    assert torch.equal(both.hidden, cond.hidden.flip(0)) and torch.equal(both.pooled, cond.pooled.flip(0))
    rep = cond.repeat(2)
    assert rep.hidden.shape[0] == 4 and torch.equal(rep.hidden[1], cond.hidden[0])
    with pytest.raises(ValueError, match="different lengths"):
        Cond.cat([cond, encode_prompts(sdxl, [LONG])])


def test_sdxl_time_ids():
    one = sdxl_time_ids((1024, 768), (0, 32), (1024, 1024), device=torch.device("cpu"), dtype=torch.float16)
    assert one.dtype == torch.float16 and one.tolist() == [[1024, 768, 0, 32, 1024, 1024]]
    many = sdxl_time_ids([(512, 512), (640, 480)], (0, 0), [(512, 512), (512, 384)], device=None)
    assert many.tolist() == [[512, 512, 0, 0, 512, 512], [640, 480, 0, 0, 512, 384]]
    with pytest.raises(ValueError, match="crop_top_left"):
        sdxl_time_ids([(1, 1)] * 3, [(0, 0)] * 2, (1, 1), device=None)
