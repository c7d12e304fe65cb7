"""The evaluation grid: geometry, cells that are exactly the saved files at their strengths,
every mode's prompts and rows, nothing after a stop, no overwriting, and bad settings refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.enginekit import MemoryHost, make_images, quick_config
from tests.modekit import loaded, mode_job, write_pair
from trainer.config.schema import TrainConfig
from trainer.training.engine import Trainer
from trainer.training.evalgrid import GridLayout, grid_layout, grid_rows, read_grid_info, write_grid
from trainer.training.events import StopFlag
from trainer.modes import get_mode
from trainer.config.options.grid import MAX_STRENGTHS
from trainer.config.params import ConfigError
from trainer.training.samples import render_samples

CPU = torch.device("cpu")
GRID = dict(eval_grid=True, sample_steps=2, eval_grid_seed=5)


def cells(path) -> tuple[dict, GridLayout, np.ndarray]:
    """The grid's description, its layout and its pixels."""
    info = read_grid_info(path)
    assert info is not None
    return info, GridLayout(**info["layout"]), np.asarray(Image.open(path).convert("RGB"))


def cell(pixels: np.ndarray, layout: GridLayout, block: int, row: int, col: int) -> np.ndarray:
    x, y = layout.cell_origin(block, row, col)
    return pixels[y:y + layout.cell_h, x:x + layout.cell_w]


def render(bundle, prompts, seed: int) -> list[np.ndarray]:
    return [np.asarray(im) for im in render_samples(bundle, prompts, steps=2, size=(64, 64), seed=seed, device=CPU)]


def run(cfg, host, stop: StopFlag | None = None, listeners=()):
    return Trainer(cfg, host, device="cpu", stop=stop, listeners=listeners).run()


def test_grid_of_a_two_save_lora_run(tmp_path, logs):
    prompts = ["a red circle", "a blue square"]
    cfg = quick_config(make_images(tmp_path / "data"), save_per_steps=2, train_learning_rate=2e-2,
                       eval_grid_prompts="\n".join(prompts), **GRID)
    host = MemoryHost(tmp_path / "out")
    result = run(cfg, host)
    grid = tmp_path / "out" / "tiny_grid.png"
    assert result.status == "done" and str(grid) in result.message
    assert host.events[-1].samples == [str(grid)] and str(grid) in host.events[-1].message
    info, layout, pixels = cells(grid)
    assert info["files"] == ["tiny_2steps.safetensors", "tiny.safetensors"] and info["steps"] == [2, 4]
    assert info["prompts"] == prompts and info["strengths"] == [0.0, 0.5, 0.75, 1.0]
    # 4 strengths x 2 saves of 64 px per prompt block, plus the label margin, titles and headers
    assert (layout.rows, layout.cols, layout.blocks, layout.cell_w, layout.cell_h) == (2, 4, 2, 64, 64)
    assert layout.label_w >= 64 and layout.title_h > 0 and layout.header_h > 0
    assert Image.open(grid).size == (layout.label_w + 4 * 64, 2 * (layout.title_h + layout.header_h + 2 * 64))
    plain = render(host.bundle, prompts, seed=5)
    for b in range(2):
        # strength 0 is the plain model at the prompt's seed, the same in every row
        assert np.array_equal(cell(pixels, layout, b, 0, 0), plain[b])
        assert np.array_equal(cell(pixels, layout, b, 1, 0), plain[b])
        for r in range(2):
            assert not np.array_equal(cell(pixels, layout, b, r, 3), plain[b])
        assert not np.array_equal(cell(pixels, layout, b, 0, 3), cell(pixels, layout, b, 1, 3))
    # each cell is its row's file at its column's strength
    for r, name in enumerate(info["files"]):
        for c, strength in ((1, 0.5), (3, 1.0)):
            with loaded(host.bundle, cfg, tmp_path / "out" / name, multipliers=(strength,)):
                want = render(host.bundle, prompts, seed=5)
            assert all(np.array_equal(cell(pixels, layout, b, r, c), want[b]) for b in range(2))


def test_a_strength_is_the_files_weight_with_the_baked_strength(tmp_path, logs):
    cfg = quick_config(make_images(tmp_path / "data", n=2), train_iterations=2, train_learning_rate=2e-2,
                       network_strength=2.0, eval_grid_strengths="0.5", eval_grid_prompts="a cat", **GRID)
    host = MemoryHost(tmp_path / "out")
    run(cfg, host)
    info, layout, pixels = cells(tmp_path / "out" / "tiny_grid.png")
    assert (layout.rows, layout.cols, layout.blocks) == (1, 1, 1)
    with loaded(host.bundle, cfg, tmp_path / "out" / "tiny.safetensors", multipliers=(1.0,)):  # 0.5 x 2 baked
        want = render(host.bundle, ["a cat"], seed=5)
    assert np.array_equal(cell(pixels, layout, 0, 0, 0), want[0])


def test_ileco_grid_has_its_original_and_target_prompts(tmp_path, logs):
    cfg = mode_job(tmp_path, "iLECO", original_prompt="a cat", target_prompt="a dog", train_iterations=2,
                   eval_grid_prompts="a house\na cat", eval_grid_strengths="0, 1", **GRID)
    run(cfg, MemoryHost(tmp_path / "out"))
    info, layout, pixels = cells(tmp_path / "out" / "ileco_grid.png")
    assert info["prompts"] == ["a cat", "a dog", "a house"]  # the mode's prompts first, no repeats
    assert layout.blocks == 3 and pixels.shape[0] == 3 * layout.block_h
    erase = mode_job(tmp_path, "iLECO", original_prompt="a cat", target_prompt="", **GRID)
    assert erase.grid_prompts() == ["a cat", ""]  # the empty target of an erase is a block too


def test_difference_grid_shows_the_difference_file_alone(tmp_path, logs):
    orig, targ = write_pair(tmp_path / "pair")
    cfg = mode_job(tmp_path, "Difference", diff_original_image=str(orig), diff_target_image=str(targ),
                   original_prompt="face", train_iterations=2, train_learning_rate=2e-2, diff_save_1st_pass=True,
                   eval_grid_strengths="0, 1", **GRID)
    host = MemoryHost(tmp_path / "out")
    result = run(cfg, host)
    assert [p.name for p in result.saved] == ["difference_copy.safetensors", "difference.safetensors"]
    info, layout, pixels = cells(tmp_path / "out" / "difference_grid.png")
    assert info["files"] == ["difference.safetensors"] and info["prompts"] == ["face"]
    assert np.array_equal(cell(pixels, layout, 0, 0, 0), render(host.bundle, ["face"], seed=5)[0])
    with loaded(host.bundle, cfg, tmp_path / "out" / "difference.safetensors", multipliers=(1.0,)):
        alone = render(host.bundle, ["face"], seed=5)[0]  # on the base model: the copier is gone
    assert np.array_equal(cell(pixels, layout, 0, 0, 1), alone)


@pytest.mark.parametrize("mode", ["ADDifT", "Multi-ADDifT"])
def test_addift_modes_render_a_grid(tmp_path, logs, mode):
    orig, targ = write_pair(tmp_path / "pair", target_suffix="_t")
    own = mode == "ADDifT"
    cfg = mode_job(tmp_path, mode, diff_original_image=str(orig), diff_target_image=str(targ),
                   lora_data_directory=str(tmp_path / "pair"), diff_target_name="_t", original_prompt="open",
                   target_prompt="closed", train_iterations=2, eval_grid_strengths="0, 1",
                   eval_grid_prompts="" if own else "a door", **GRID)
    result = run(cfg, MemoryHost(tmp_path / "out"))
    info, layout, _ = cells(tmp_path / "out" / f"{mode.lower()}_grid.png")
    assert info["files"] == [result.output.name]
    assert info["prompts"] == (["open", "closed"] if own else ["a door"])


def test_sdxl_grid(tmp_path, logs):
    cfg = quick_config(make_images(tmp_path / "data", n=2), train_iterations=2, train_learning_rate=2e-2,
                       eval_grid_strengths="0, 1", eval_grid_prompts="a cat", **GRID)
    host = MemoryHost(tmp_path / "out", family="sdxl")
    run(cfg, host)
    info, layout, pixels = cells(tmp_path / "out" / "tiny_grid.png")
    assert np.array_equal(cell(pixels, layout, 0, 0, 0), render(host.bundle, ["a cat"], seed=5)[0])
    assert not np.array_equal(cell(pixels, layout, 0, 0, 1), cell(pixels, layout, 0, 0, 0))


def test_images_larger_than_a_cell_are_shrunk(tmp_path, logs, monkeypatch):
    from trainer.training import evalgrid

    assert evalgrid.cell_size(1024, 1024) == (512, 512) and evalgrid.cell_size(768, 512) == (512, 341)
    assert evalgrid.cell_size(64, 48) == (64, 48)
    monkeypatch.setattr(evalgrid, "CELL_MAX", 32)
    cfg = quick_config(make_images(tmp_path / "data", n=2), train_iterations=2, eval_grid_strengths="0",
                       eval_grid_prompts="a cat", **GRID)
    host = MemoryHost(tmp_path / "out")
    run(cfg, host)
    info, layout, pixels = cells(tmp_path / "out" / "tiny_grid.png")
    assert (layout.cell_w, layout.cell_h) == (32, 32)
    plain = render_samples(host.bundle, ["a cat"], steps=2, size=(64, 64), seed=5, device=CPU)[0]
    assert np.array_equal(cell(pixels, layout, 0, 0, 0), np.asarray(plain.resize((32, 32), Image.LANCZOS)))


def test_out_of_memory_in_the_grid_keeps_the_job_done(tmp_path, logs, monkeypatch):
    from trainer.training import evalgrid

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(evalgrid, "render_samples", oom)
    cfg = quick_config(make_images(tmp_path / "data", n=2), train_iterations=2, eval_grid_prompts="a cat", **GRID)
    result = run(cfg, MemoryHost(tmp_path / "out"))
    assert result.status == "done" and result.output.is_file()
    assert "evaluation grid skipped: out of memory" in result.message
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("save", [False, True])
def test_a_stopped_run_renders_no_grid(tmp_path, logs, save):
    cfg = quick_config(make_images(tmp_path / "data", n=2), train_iterations=50, eval_grid_prompts="a cat", **GRID)
    stop = StopFlag()

    def at_step_2(p) -> None:
        if p.step >= 2:
            stop.request(save=save)

    result = run(cfg, MemoryHost(tmp_path / "out"), stop, [at_step_2])
    assert result.status == "stopped" and (result.output is not None) == save
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_stop_while_the_grid_renders_writes_no_grid(tmp_path, logs):
    cfg = quick_config(make_images(tmp_path / "data", n=2), train_iterations=2, save_per_steps=1,
                       eval_grid_prompts="a cat", **GRID)
    stop = StopFlag()
    result = run(cfg, MemoryHost(tmp_path / "out"), stop,
                 [lambda p: stop.request() if p.message.startswith("evaluation grid:") else None])
    assert result.status == "stopped" and [p.name for p in result.saved] == ["tiny_1steps.safetensors",
                                                                             "tiny.safetensors"]
    assert not list((tmp_path / "out").glob("*.png"))


def test_grid_rows_are_the_files_of_the_result_pass(tmp_path):
    orig, targ = write_pair(tmp_path / "pair")
    cfg = mode_job(tmp_path, "Difference", diff_original_image=str(orig), diff_target_image=str(targ),
                   train_iterations=6, save_per_steps=3, diff_save_1st_pass=True)
    specs = get_mode("Difference").passes(cfg)
    names = ["difference_copy_3steps", "difference_copy", "difference_3steps", "difference"]
    spec, rows = grid_rows(specs, [tmp_path / f"{n}.safetensors" for n in names])
    assert spec.role == "difference" and [(p.stem, s) for p, s in rows] == [("difference_3steps", 3), ("difference", 6)]
    only = mode_job(tmp_path, "Difference", diff_original_image=str(orig), diff_target_image=str(targ),
                    train_iterations=6, diff_1st_pass_only=True)
    spec, rows = grid_rows(get_mode("Difference").passes(only), [tmp_path / "difference_copy.safetensors"])
    assert spec.role == "copier" and [s for _, s in rows] == [6]
    spec, rows = grid_rows(specs, [tmp_path / "difference.safetensors", tmp_path / "difference-extra.safetensors"])
    assert spec.role == "difference" and [p.name for p, _ in rows] == ["difference.safetensors"]
    with pytest.raises(ValueError, match="none of"):
        grid_rows(specs, [tmp_path / "other.safetensors"])


def test_an_existing_grid_is_kept_unless_overwrite(tmp_path):
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    wanted = tmp_path / "x_grid.png"
    wanted.write_bytes(b"not mine")
    path = write_grid(image, wanted, {"n": 1}, overwrite=False)
    assert path == tmp_path / "x_grid-2.png" and wanted.read_bytes() == b"not mine"
    assert read_grid_info(path) == {"n": 1} and read_grid_info(wanted.with_name("none.png")) is None
    assert write_grid(image, wanted, {"n": 2}, overwrite=True) == wanted and read_grid_info(wanted) == {"n": 2}
    plain = tmp_path / "sample.png"
    image.save(plain)
    assert read_grid_info(plain) is None  # a sample image is not a grid


def test_label_margin_grows_with_the_file_names(tmp_path):
    short = grid_layout((64, 64), [(tmp_path / "a.safetensors", 1)], 2, 1)
    long = grid_layout((64, 64), [(tmp_path / f"{'n' * 30}_100steps.safetensors", 100)], 2, 1)
    assert short.label_w == 64 < long.label_w and long.size == (long.label_w + 128, long.block_h)


def _bad(tmp_path, **over) -> ConfigError:
    cfg = quick_config(tmp_path, **{"eval_grid": True, "eval_grid_prompts": "a cat", **over})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    return info.value


@pytest.mark.parametrize("text, problem", [
    ("0, a", "'a' is not a number"), ("", "is empty"), (" , ", "is empty"), ("0, nan", "finite"),
    ("1e9", "within"), (", ".join(["1"] * (MAX_STRENGTHS + 1)), f"at most {MAX_STRENGTHS} columns"),
])
def test_bad_strengths_are_refused(tmp_path, text, problem):
    err = _bad(tmp_path, eval_grid_strengths=text)
    assert err.key == "eval_grid_strengths" and err.value == text and problem in str(err)


def test_other_bad_grid_settings_are_refused(tmp_path):
    err = _bad(tmp_path, eval_grid_prompts="")
    assert err.key == "eval_grid_prompts" and "LoRA has no prompts" in str(err)
    err = _bad(tmp_path, eval_grid_prompts="\n".join(f"p{i}" for i in range(9)))
    assert err.key == "eval_grid_prompts" and "at most 8" in str(err)
    err = _bad(tmp_path, save_per_steps=1, train_iterations=40)
    assert err.key == "save_per_steps" and err.value == 1 and "40 files" in str(err)
    assert _bad(tmp_path, network_strength=0.0).key == "eval_grid"
    err = _bad(tmp_path, eval_grid_prompts="\n".join(f"p{i}" for i in range(8)), save_per_steps=1,
               train_iterations=9, eval_grid_strengths="0 0.25 0.5 0.75 1")
    assert err.key == "eval_grid_strengths" and "makes 360 images" in str(err)  # 9 saves x 5 x 8
    # off, the grid settings are not used and not checked; sample prompts stand in for grid prompts
    quick_config(tmp_path, eval_grid_strengths="x").validate()
    assert quick_config(tmp_path, eval_grid=True, sample_prompts="a\nb").validate().grid_prompts() == ["a", "b"]
    assert TrainConfig(mode="Difference", original_prompt="face", eval_grid=True).grid_prompts() == ["face"]


def test_a_bad_grid_setting_fails_before_training(tmp_path, logs):
    cfg = quick_config(make_images(tmp_path / "data", n=2), eval_grid=True, eval_grid_strengths="0, one")
    with pytest.raises(ConfigError, match="eval_grid_strengths"):
        run(cfg, MemoryHost(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
