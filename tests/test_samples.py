"""Sample images: sizes, seeds, the network's effect, no copies, state restored, files, prompt lists."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image

from tests.tiny import tiny_bundle
from trainer.training import samples
from trainer.config.schema import TrainConfig
from trainer.networks.network import Network
from trainer.config.params import ConfigError
from trainer.training.samples import check_size, parse_prompts, render_samples, save_samples

CPU = torch.device("cpu")
PROMPTS = ["a photo of a cat", "a red car"]
LONG = " ".join(["cat"] * 100)  # two 75-token chunks against the negative prompt's one


def render(bundle, prompts=PROMPTS, **kw) -> list[np.ndarray]:
    kw = {"steps": 2, "size": (64, 64), "device": CPU, **kw}
    return [np.asarray(im) for im in render_samples(bundle, prompts, **kw)]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture()
def spy(monkeypatch) -> list:
    """Every pipeline render_samples builds."""
    built = []
    real = samples.build_pipeline

    def wrapper(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(samples, "build_pipeline", wrapper)
    return built


# ---- images --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_one_image_of_the_asked_size_per_prompt(family: str, spy) -> None:
    bundle = tiny_bundle(family)
    images = render_samples(bundle, [*PROMPTS, LONG], steps=2, size=(48, 64), device=CPU)
    assert len(images) == 3
    for im in images:
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (64, 48)  # PIL: (w, h)
        assert np.asarray(im).std() > 1  # a picture, not a blank
    assert len(spy) == 1
    want = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    assert type(spy[0]).__name__ == want


def test_default_size_is_the_models_own_and_no_progress_bar(capsys) -> None:
    bundle = tiny_bundle("sd1")
    assert render_samples(bundle, ["cat"], steps=1, device=CPU)[0].size == (64, 64)  # sample_size 8 * 8 px
    assert "it/s" not in capsys.readouterr().err


def test_seeds() -> None:
    bundle = tiny_bundle("sd1")
    first = render(bundle, seed=3)
    assert same(render(bundle, seed=3), first)
    other = render(bundle, seed=4)
    assert not np.array_equal(other[0], first[0]) and not np.array_equal(other[1], first[1])
    # prompt i is drawn with seed + i, whatever comes before it in the list
    assert same(render(bundle, [PROMPTS[1]], seed=4), first[1:])
    assert not np.array_equal(first[0], first[1])


def test_prompt_and_negative_prompt_matter() -> None:
    bundle = tiny_bundle("sd1")
    base = render(bundle, ["a photo of a cat"])
    assert not same(render(bundle, ["a photo of a dog"]), base)
    assert not same(render(bundle, ["a photo of a cat"], negative_prompt="blurry"), base)
    assert not same(render(bundle, ["a photo of a cat"], guidance=1.0), base)


def test_v_prediction_schedule_is_kept(spy) -> None:
    bundle = tiny_bundle("sd2")
    v = render(bundle)
    assert isinstance(spy[0].scheduler, DDIMScheduler)
    assert spy[0].scheduler.config.prediction_type == "v_prediction"
    render(bundle, sampler="euler")
    assert isinstance(spy[1].scheduler, EulerDiscreteScheduler)
    assert spy[1].scheduler.config.prediction_type == "v_prediction"
    bundle.noise_scheduler = tiny_bundle("sd1").noise_scheduler  # epsilon
    assert not same(render(bundle), v)
    with pytest.raises(ValueError, match="sampler"):
        render(bundle, sampler="plms")


# ---- the network -----------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_network_multiplier_at_call_time(family: str) -> None:
    bundle = tiny_bundle(family)
    before = render(bundle)
    cfg = TrainConfig(network_type="lierla", network_rank=4, network_alpha=4.0, save_lora_name="s")
    net = Network.build(bundle, cfg, train_text_encoder=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained-looking, non-zero delta everywhere
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    full = render(bundle)
    assert not same(full, before)
    with net.disabled():
        assert same(render(bundle), before)
    with net.scaled(0.5):
        half = render(bundle)
    assert not same(half, before) and not same(half, full)
    assert net.multiplier == 1.0 and same(render(bundle), full)


# ---- no copies, state restored ---------------------------------------------------
def test_the_bundles_own_modules_run_and_state_is_restored(spy) -> None:
    bundle = tiny_bundle("sdxl")
    bundle.unet.train()
    bundle.unet.conv_out.eval()  # mixed modes come back per submodule
    bundle.vae.train()
    weight = bundle.unet.conv_in.weight
    weight.requires_grad_(True)
    te_weight = next(bundle.text_encoders[1].parameters())
    seen, counts = [], []

    def hook(module, args, output):
        seen.append((module, module.training))
        if not counts:
            counts.append(sum(issubclass(type(o), UNet2DConditionModel) for o in gc.get_objects()))

    n_unets = sum(issubclass(type(o), UNet2DConditionModel) for o in gc.get_objects())
    watched = [bundle.unet, bundle.vae.decoder, *bundle.text_encoders]
    handles = [m.register_forward_hook(hook) for m in watched]
    try:
        render(bundle, [PROMPTS[0]])
    finally:
        for h in handles:
            h.remove()
    assert {id(m) for m, _ in seen} == {id(m) for m in watched}  # a copy would report itself
    assert not any(training for _, training in seen)  # sampled in eval mode
    assert counts == [n_unets]
    pipe = spy[0]
    assert pipe.unet is bundle.unet and pipe.vae is bundle.vae
    assert pipe.text_encoder is bundle.text_encoders[0] and pipe.text_encoder_2 is bundle.text_encoders[1]
    assert bundle.unet.training and not bundle.unet.conv_out.training and bundle.unet.conv_in.training
    assert bundle.vae.training and not bundle.text_encoders[0].training
    assert weight.requires_grad and bundle.unet.conv_in.weight is weight
    assert not te_weight.requires_grad and not bundle.unet.conv_out.weight.requires_grad


def test_fp16_vae_decodes_in_fp32_and_is_put_back() -> None:
    bundle = tiny_bundle("sd1")
    want = render(bundle)
    bundle.vae.half()
    param = next(bundle.vae.parameters())
    data, ptr = param.data, param.data_ptr()
    dtypes = []
    handle = bundle.vae.decoder.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    try:
        got = render(bundle)
    finally:
        handle.remove()
    assert dtypes == [torch.float32] * len(PROMPTS)  # fp16 SD VAEs overflow; diffusers upcasts them too
    assert next(bundle.vae.parameters()) is param and param.dtype == torch.float16
    assert param.data_ptr() == ptr and torch.equal(param.data, data)  # the very same tensor, not a re-cast
    for g, w in zip(got, want, strict=True):  # only the fp16 rounding of the weights differs
        assert np.abs(g.astype(int) - w).max() <= 8


def test_modules_elsewhere_are_moved_for_the_call_and_put_back() -> None:
    # the meta device stands in for an accelerator: the VAE of a training job waits on the CPU
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    before = [(t, t.data_ptr()) for t in [*module.parameters(), *module.buffers()]]
    with samples._placed(module, torch.device("meta")):
        assert all(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])
    after = [*module.parameters(), *module.buffers()]
    assert [t.data_ptr() for t in after] == [ptr for _, ptr in before]  # the original storage, no copy back
    assert all(t.device == CPU for t in after) and after[0] is before[0][0]


def test_global_rng_untouched() -> None:
    bundle = tiny_bundle("sd1")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    render(bundle)
    assert torch.equal(torch.get_rng_state(), state)


# ---- arguments -------------------------------------------------------------------
@pytest.mark.parametrize("size", [(60, 64), (64, 36), (0, 64), (4, 8), (64.5, 64), (-8, 64)])
def test_bad_sizes_are_refused(size) -> None:
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        render_samples(tiny_bundle("sd1"), ["cat"], size=size, device=CPU)


def test_arguments() -> None:
    assert check_size((8, 1024)) == (8, 1024)
    with pytest.raises(ValueError, match="height, width"):
        check_size((64,))
    bundle = tiny_bundle("sd1")
    with pytest.raises(ValueError, match="steps"):
        render_samples(bundle, ["cat"], steps=0, device=CPU)
    assert render_samples(bundle, [], device=CPU) == []


# ---- files -----------------------------------------------------------------------
def test_save_samples_round_trip_and_never_overwrite(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(2)]
    folder = tmp_path / "samples"
    paths = save_samples(images, folder, "run_000010")
    assert [p.name for p in paths] == ["run_000010_0.png", "run_000010_1.png"]
    first_bytes = [p.read_bytes() for p in paths]
    again = save_samples(images[::-1], folder, "run_000010")
    assert [p.name for p in again] == ["run_000010_0-2.png", "run_000010_1-2.png"]
    assert [p.read_bytes() for p in paths] == first_bytes
    for path, im in zip([*paths, *again], [*images, *images[::-1]], strict=True):
        with Image.open(path) as back:
            assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(im))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in [*paths, *again])  # no temp files
    with pytest.raises(ConfigError):
        save_samples(images, folder, "../escape")


def test_parse_prompts() -> None:
    assert parse_prompts("a cat\n\n   a dog, 1girl  \r\n\t\n") == ["a cat", "a dog, 1girl"]
    assert parse_prompts("") == [] and parse_prompts(" \n ") == []
    assert parse_prompts(["a cat", "  ", "b\nc"]) == ["a cat", "b", "c"]
