"""Aspect-ratio buckets: exact lists, invariants, nearest-ratio choice, sub buckets."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data import make_buckets, nearest_bucket, plan_variants, sub_buckets_for
from trainer.config.params import ConfigError


def test_square_512_step_256():
    b = make_buckets([512, 512], 256, 256, 2.0, multiple=64)
    assert b.main == [(256, 512), (512, 512), (512, 256)]
    assert b.sub == [(256, 256)]
    assert b.max_pixels == 512 * 512


def test_landscape_512_by_768():
    # image_size is [height, width]; buckets are (width, height).
    b = make_buckets([512, 768], 256, 256, 2.0, multiple=64)
    assert b.main == [(512, 768), (512, 512), (768, 512)]
    # (256, 768) is over the 2:1 limit and (768, 768) over the pixel budget.
    assert b.sub == [(256, 512), (256, 256), (512, 256)]


def test_512_step_64_min_256():
    b = make_buckets([512, 512], 64, 256, 2.0, multiple=64)
    tall = [(256, 512), (320, 512), (384, 512), (448, 512)]
    assert b.main == tall + [(512, 512)] + [(h, w) for w, h in reversed(tall)]
    assert (448, 448) in b.sub and (256, 256) in b.sub and (320, 448) in b.sub
    assert not set(b.main) & set(b.sub)
    assert len(b.sub) == 16


def test_multiple_rounds_down_and_dedupes():
    # step 96 puts sides at 192, 288, 384; multiple 64 turns 288 into 256.
    b = make_buckets([384, 384], 96, 192, 2.0, multiple=64)
    assert b.main == [(192, 384), (256, 384), (384, 384), (384, 256), (384, 192)]
    assert b.sub == [(192, 256), (192, 192), (256, 256), (256, 192)]
    assert make_buckets([384, 384], 96, 192, 2.0, multiple=8).sub[:2] == [(192, 288), (192, 192)]


def test_portrait_image_size_square_stays_within_budget():
    # TrainTrain's (h, h) square would be 768x768 > 768*512 pixels here.
    b = make_buckets([768, 512], 256, 256, 2.0, multiple=64)
    assert (512, 512) in b.main and (768, 768) not in b.main
    assert all(w * h <= 768 * 512 for w, h in b.main + b.sub)


def test_min_length_above_size_gives_only_the_square():
    b = make_buckets([512, 512], 256, 1024, 2.0, multiple=64)
    assert b.main == [(512, 512)] and b.sub == []


def test_zero_height_is_dropped():
    # 128*128 // 128 = 128 < step 256: the height floors to 0 and gives no bucket.
    b = make_buckets([128, 128], 256, 128, 2.0, multiple=64)
    assert b.main == [(128, 128)]


def test_size_below_multiple_is_config_error():
    with pytest.raises(ConfigError) as err:
        make_buckets([32, 512], 64, 32, 2.0, multiple=64)
    assert err.value.key == "image_size(height, width)" and err.value.value == [32, 512]


def test_a_bucket_at_exactly_the_ratio_limit_comes_with_its_transpose():
    """184x160 is 1.15 either way round; both orientations are buckets or neither is."""
    b = make_buckets([64, 464], 8, 8, 1.15, 8)
    for group in (b.main, b.sub):
        assert set(group) == {(y, x) for x, y in group}
    assert (184, 160) in b.all and (160, 184) in b.all


@settings(max_examples=150, deadline=None)
@given(h=st.integers(8, 160).map(lambda x: x * 8), w=st.integers(8, 160).map(lambda x: x * 8),
       step=st.sampled_from([8, 32, 64, 100, 128, 256]), min_length=st.integers(8, 1024),
       ratio=st.floats(1.0, 4.0), multiple=st.sampled_from([8, 32, 64]))
def test_invariants(h, w, step, min_length, ratio, multiple):
    if min(h, w) < multiple:
        return
    b = make_buckets([h, w], step, min_length, ratio, multiple)
    assert b.main, "the square is always there"
    assert not set(b.main) & set(b.sub)
    for group in (b.main, b.sub):
        assert set(group) == {(y, x) for x, y in group}, "transposes present"
        assert len(group) == len(set(group))
        assert [x / y for x, y in group] == sorted(x / y for x, y in group)
        for x, y in group:
            assert x > 0 and y > 0 and x % multiple == 0 and y % multiple == 0
            assert x * y <= h * w
            assert 1 / ratio - 1e-9 <= x / y <= ratio + 1e-9


@pytest.mark.parametrize("size, expected", [
    ((300, 600), (256, 512)),   # portrait
    ((600, 300), (512, 256)),   # landscape
    ((1000, 1000), (512, 512)),  # square
    ((500, 400), (512, 512)),   # 1.25: nearer 1 than 2
    ((700, 400), (512, 256)),   # 1.75: nearer 2 than 1 (log scale)
    ((64, 640), (256, 512)),    # beyond the limit: the most extreme bucket
])
def test_nearest_ratio(size, expected):
    b = make_buckets([512, 512], 256, 256, 2.0, multiple=64)
    assert nearest_bucket(*size, b.main) == expected


def test_nearest_ratio_is_symmetric_on_log_scale():
    buckets = [(512, 512), (256, 512), (512, 256)]
    # sqrt(2) is exactly half way on a log scale; ties go to the larger bucket.
    assert nearest_bucket(1414, 1000, buckets) == (512, 512)
    assert nearest_bucket(1415, 1000, buckets) == (512, 256)
    assert nearest_bucket(1000, 1415, buckets) == (256, 512)


def test_sub_buckets_nearest_ratio_then_largest():
    b = make_buckets([512, 512], 64, 256, 2.0, multiple=64)
    assert sub_buckets_for(512, 512, (512, 512), b, 3) == [(448, 448), (384, 384), (320, 320)]
    assert sub_buckets_for(300, 600, (256, 512), b, 5) == [(256, 448), (256, 384), (256, 320), (256, 256)]
    assert sub_buckets_for(300, 600, (256, 512), b, 0) == []


def test_sub_buckets_are_smaller_than_their_main_bucket():
    b = make_buckets([512, 768], 64, 256, 2.0, multiple=64)
    for size in [(100, 100), (300, 700), (900, 500), (640, 480)]:
        main = nearest_bucket(*size, b.main)
        subs = sub_buckets_for(*size, main, b, 4)
        assert len(subs) == 4 and len(set(subs)) == 4
        for w, h in subs:
            assert (w, h) in b.sub
            assert w <= main[0] and h <= main[1] and w * h < main[0] * main[1]


def test_plan_variants_main_sub_and_mirror():
    b = make_buckets([512, 512], 256, 256, 2.0, multiple=64)
    plain = plan_variants(600, 600, b, sub_image_num=2, mirroring=False)
    assert [(v.bucket, v.sub_index, v.mirrored) for v in plain] == [((512, 512), 0, False), ((256, 256), 1, False)]
    mirrored = plan_variants(600, 600, b, sub_image_num=1, mirroring=True)
    assert [(v.bucket, v.sub_index, v.mirrored) for v in mirrored] == [
        ((512, 512), 0, False), ((512, 512), 0, True), ((256, 256), 1, False), ((256, 256), 1, True)]
