"""Caption shuffling, tag and caption dropout: what each does, seeded, and the text cache."""
from __future__ import annotations

import logging
import random

import pytest
import torch

from trainer.data.captions import CaptionTricks, not_cached_message, split_tags
from trainer.training.engine import Trainer
from trainer.families.textenc import encode_prompts

from tests.enginekit import MemoryHost, make_images, quick_config

CAPTION = "sks, red hair, smile, hat, outdoors, night, bokeh"
DRAWS = 10_000


def test_split_tags_strips_and_drops_empty_tags():
    assert split_tags(" a ,b,, c d ,") == ["a", "b", "c d"]
    assert split_tags("") == []


def test_no_trick_returns_the_caption_untouched():
    tricks = CaptionTricks(keep_tokens=2)
    assert tricks.apply("a,b ,  c") == "a,b ,  c" and not tricks.active


def test_shuffle_keeps_the_first_keep_tokens_and_every_tag():
    tricks = CaptionTricks(shuffle=True, keep_tokens=2, seed=1)
    tags = split_tags(CAPTION)
    seen = set()
    for _ in range(300):
        out = split_tags(tricks.apply(CAPTION))
        assert out[:2] == tags[:2] and sorted(out[2:]) == sorted(tags[2:])
        seen.add(tuple(out[2:]))
    assert len(seen) > 100  # 120 orders of the 5 free tags; 300 draws find most of them


def test_shuffle_with_keep_tokens_zero_moves_the_first_tag_too():
    tricks = CaptionTricks(shuffle=True, keep_tokens=0, seed=3)
    firsts = {split_tags(tricks.apply(CAPTION))[0] for _ in range(200)}
    assert firsts == set(split_tags(CAPTION))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_caption_dropout_rate_is_the_share_of_empty_captions(rate):
    tricks = CaptionTricks(dropout_rate=rate, seed=11)
    outs = [tricks.apply(CAPTION) for _ in range(DRAWS)]
    empty = sum(o == "" for o in outs) / DRAWS
    sigma = (rate * (1 - rate) / DRAWS) ** 0.5
    assert abs(empty - rate) < 4 * sigma, (empty, rate)
    assert set(outs) == {"", CAPTION}  # dropout alone never rewrites a caption: the text cache holds both


def test_tag_dropout_drops_each_free_tag_at_its_rate_and_never_a_kept_one():
    rate, keep = 0.3, 1
    tricks = CaptionTricks(tag_dropout_rate=rate, keep_tokens=keep, seed=5)
    tags = split_tags(CAPTION)
    kept_count = {t: 0 for t in tags}
    for _ in range(DRAWS):
        out = split_tags(tricks.apply(CAPTION))
        assert out[0] == "sks"
        assert out == [t for t in tags if t in out]  # order kept when not shuffling
        for t in out:
            kept_count[t] += 1
    assert kept_count["sks"] == DRAWS
    sigma = (rate * (1 - rate) / DRAWS) ** 0.5
    for tag in tags[keep:]:
        dropped = 1 - kept_count[tag] / DRAWS
        assert abs(dropped - rate) < 4 * sigma, (tag, dropped)


def test_same_seed_same_captions_other_seed_others_and_global_rngs_untouched():
    def run(seed):
        tricks = CaptionTricks(shuffle=True, keep_tokens=1, dropout_rate=0.1, tag_dropout_rate=0.2, seed=seed)
        return [tricks.apply(CAPTION) for _ in range(50)]

    py_state, torch_state = random.getstate(), torch.random.get_rng_state()
    first = run(42)
    assert random.getstate() == py_state and torch.equal(torch.random.get_rng_state(), torch_state)
    assert run(42) == first
    assert run(43) != first


def test_from_config_reads_the_data_options(tmp_path):
    cfg = quick_config(tmp_path, caption_shuffle=True, keep_tokens=3, caption_dropout_rate=0.25,
                       caption_tag_dropout_rate=0.5)
    tricks = CaptionTricks.from_config(cfg, seed=9)
    assert (tricks.shuffle, tricks.keep_tokens, tricks.dropout_rate, tricks.tag_dropout_rate, tricks.seed) == \
        (True, 3, 0.25, 0.5, 9)
    assert tricks.reasons == ["caption_shuffle", "caption_tag_dropout_rate"]
    assert not_cached_message(tricks) == ("captions change every step (caption_shuffle, caption_tag_dropout_rate): "
                                          "text-encoder outputs are not cached")


# ---- through a LoRA run ----------------------------------------------------------
class RecordingHost(MemoryHost):
    """Records every no-grad text encoding the job asks for."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.encoded: list[list[str]] = []

    def encode_fn(self, bundle):
        def encode(prompts):
            self.encoded.append(list(prompts))
            return encode_prompts(bundle, prompts)

        return encode


def _run(tmp_path, name: str, **over) -> RecordingHost:
    data = make_images(tmp_path / "data", n=2)
    for i in range(2):
        (data / f"img{i}.txt").write_text(f"pattern {i}, stripes, blue, round", encoding="utf-8")
    host = RecordingHost(tmp_path / name)
    cfg = quick_config(data, lora_trigger_word="sks", train_iterations=5, save_lora_name=name, **over)
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done" and result.steps == 5
    return host


def test_shuffle_bypasses_the_text_cache_and_says_so(tmp_path, logs, caplog):
    caplog.set_level(logging.WARNING, logger="trainer")
    host = _run(tmp_path, "a", caption_shuffle=True, keep_tokens=1)
    # No warm-up of single captions: one encode per step, of the whole (shuffled) batch.
    assert [len(p) for p in host.encoded] == [2] * 5
    prompts = [p for batch in host.encoded for p in batch]
    assert all(p.startswith("sks, ") for p in prompts)
    assert len(set(prompts)) > 2  # on disk there are only two captions
    message = "captions change every step (caption_shuffle): text-encoder outputs are not cached"
    assert any(message in e.message for e in host.events)
    assert message in caplog.text
    again = _run(tmp_path, "b", caption_shuffle=True, keep_tokens=1)
    assert again.encoded == host.encoded  # the pass's seed fixes every shuffle


def test_caption_dropout_alone_keeps_the_cache_with_the_empty_prompt(tmp_path, logs):
    host = _run(tmp_path, "c", caption_dropout_rate=0.5)
    # Every caption, and "", encoded once on its own while preparing; nothing per step.
    assert sorted(host.encoded) == [[""], ["sks, pattern 0, stripes, blue, round"],
                                    ["sks, pattern 1, stripes, blue, round"]]
    assert not any("not cached" in e.message for e in host.events)


def test_file_names_become_captions_in_a_run(tmp_path, logs):
    data = tmp_path / "data"
    make_images(data, n=2, captions=False)
    for i in range(2):
        (data / f"img{i}.png").rename(data / f"red_apple_{i}.png")
    host = RecordingHost(tmp_path / "out")
    cfg = quick_config(data, image_use_filename_as_tag=True, train_iterations=2)
    assert Trainer(cfg, host, device="cpu").run().status == "done"
    assert sorted(host.encoded) == [["red, apple, 0"], ["red, apple, 1"]]


def test_a_training_text_encoder_sees_the_shuffled_captions(tmp_path, logs, monkeypatch):
    import trainer.families.textenc as textenc
    from trainer.config.schema import BLOCK_IDS

    with_grad: list[list[str]] = []
    real = textenc.encode_prompts

    def spy(bundle, prompts, **kw):
        if kw.get("grad"):
            with_grad.append(list(prompts))
        return real(bundle, prompts, **kw)

    monkeypatch.setattr(textenc, "encode_prompts", spy)
    host = _run(tmp_path, "te", caption_shuffle=True, keep_tokens=1, network_blocks=list(BLOCK_IDS))
    assert host.encoded == [] and len(with_grad) == 5
    prompts = [p for batch in with_grad for p in batch]
    assert all(p.startswith("sks, ") for p in prompts) and len(set(prompts)) > 2


def test_the_caption_generator_is_saved_with_the_training_state():
    from trainer.training.state import rng_holders

    tricks = CaptionTricks(shuffle=True, seed=4)
    assert rng_holders({"captions": tricks}) == {"captions": tricks.rng}
    state = tricks.rng.getstate()
    first = [tricks.apply(CAPTION) for _ in range(5)]
    tricks.rng.setstate(state)
    assert [tricks.apply(CAPTION) for _ in range(5)] == first
