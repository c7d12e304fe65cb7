"""The rows of tests/test_bad_inputs.py: how to make each bad input, where it goes in, what it must name.

A row is ``pytest.param(entry, make, field, id=...)``: ``make(ctx)`` writes what it needs under
``ctx.tmp`` and returns ``(argument for the entry, fragments)``; the entry must refuse it naming
``field``, and every fragment (the refused value, or the part of it the message shows) must be in
the message.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from tests.badinputkit import (Ctx, corrupt, empty, evil_ckpt, network_file, png, png_header, sets, text, truncated,
                               unlistable)

DATA, ORIG, TARG, SUFFIX = "lora_data_directory", "diff_original_image", "diff_target_image", "diff_target_name"
SIZE, NAME = "image_size(height, width)", "save_lora_name"
OPT, SCHED, RULES = "train_optimizer_settings", "train_lr_scheduler_settings", "train_lr_step_rules"
Made = tuple[Any, tuple[str, ...]]
Maker = Callable[[Ctx], Made]


def row(id: str, entry: str, make: Maker, field: str) -> Any:
    return pytest.param(entry, make, field, id=id)


def setting(id: str, entry: str, key: str, value: Callable[[Ctx], Any] | str, *fragments: str, **extra: Any) -> Any:
    """One bad setting, by the CLI's ``--set`` or on a Trainer job (with `extra` settings as well).

    The message must show `fragments`, or the value's repr when none are given.
    """
    def make(c: Ctx) -> Made:
        got = value(c) if callable(value) else value
        shown = fragments or (repr(str(got)),)
        if entry == "cli":
            return sets(*(f"{k}={v}" for k, v in extra.items()), f"{key}={got}"), shown
        return c.job().with_overrides({**extra, key: str(got)}), shown
    return row(id, entry, make, key)


def preset(id: str, field: str, fragment: str, **values: Any) -> Any:
    """The valid job as a preset file with `values` changed (json writes NaN, Infinity, huge ints); load_preset."""
    def make(c: Ctx) -> Made:
        path = c.tmp / "preset.json"
        path.write_text(json.dumps({**c.job().to_dict(), **values}), encoding="utf-8")
        return path, (fragment,)
    return row(id, "preset", make, field)


def preset_file(id: str, content: str | bytes, *fragments: str, entry: str = "preset") -> Any:
    """A preset file holding `content`; refused naming the field "preset" and the file."""
    def make(c: Ctx) -> Made:
        path = text(c.tmp / "bad preset.json", content)
        return (["--preset", str(path)] if entry == "cli" else path), (str(path), *fragments)
    return row(id, entry, make, "preset")


# ---- data folders and images --------------------------------------------------------------------
def only(write: Callable[[Path], Path], name: str = "only.png") -> Callable[[Ctx], Path]:
    """A folder holding one bad image (named in the message, beside the folder)."""
    def build(c: Ctx) -> Path:
        write(c.folder("bad") / name)
        return c.tmp / "bad"
    return build


def caption(raw: bytes) -> Callable[[Ctx], Path]:
    def build(c: Ctx) -> Path:
        png(c.folder("captions") / "a.png")
        text(c.tmp / "captions" / "a.txt", raw)
        return c.tmp / "captions"
    return build


def data(id: str, entry: str, build: Callable[[Ctx], Path | str], *fragments: str, inside: str = "") -> Any:
    """A bad lora_data_directory: the message shows the folder, the file `inside` it and `fragments`."""
    def make(c: Ctx) -> Made:
        folder = build(c)
        shown = (str(folder), *((str(Path(folder) / inside),) if inside else ()), *fragments)
        return (sets(f"{DATA}={folder}") if entry == "cli" else c.job(lora_data_directory=str(folder))), shown
    return row(id, entry, make, DATA)


def bomb(path: Path) -> Path:
    return png_header(path, 20000, 20000)


def dot(path: Path) -> Path:
    return png(path, size=(1, 1))


# ---- pairs ----------------------------------------------------------------------------------------
def pair(id: str, field: str, orig: Callable[[Ctx], Any] | None = None, targ: Callable[[Ctx], Any] | None = None,
         *fragments: str, entry: str = "trainer", mode: str = "Difference", named: bool = True) -> Any:
    """A pair job with one (or both) images replaced; the message shows the bad image (when `named`)
    and `fragments`."""
    def make(c: Ctx) -> Made:
        o, t = (orig(c) if orig else None), (targ(c) if targ else None)
        shown = ((repr(str(t if field == TARG else o)),) if named else ()) + fragments
        job = c.pair_job(o, t, mode=mode)
        if entry == "cli":
            return sets(f"mode={mode}", f"{ORIG}={job.diff_original_image}", f"{TARG}={job.diff_target_image}"), shown
        return job, shown
    return row(id, entry, make, field)


def lifted_bombs(c: Ctx) -> Path:
    c.mp.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a host that lifted Pillow's own limit
    bomb(c.tmp / "t.png")
    return bomb(c.tmp / "o.png")


def multi(target_size: tuple[int, int] | None) -> Maker:
    """Multi-ADDifT on a folder with x.png and, if sized, an x_target.png of that size."""
    def make(c: Ctx) -> Made:
        folder = c.folder("multi")
        png(folder / "x.png")
        job = c.job(mode="Multi-ADDifT", lora_data_directory=str(folder), diff_target_name="_target")
        if target_size is None:
            return job, ("'_target'", "no image")
        png(folder / "x_target.png", size=target_size)
        return job, (str(folder / "x_target.png"), "48x32", "64x64")
    return make


# ---- logs, models, resume files -------------------------------------------------------------------
def log(id: str, name: Callable[[Path], str]) -> Any:
    """resolve_log on a name that leaves logs/ (a real CSV waits outside, a link points at it)."""
    def make(c: Ctx) -> Made:
        outside = text(c.tmp / "outside.csv", "Step,Loss\n1,0.5\n")
        text(c.logs / "20260101" / "ok.csv", "Step,Loss\n1,0.5\n")
        (c.logs / "link.csv").symlink_to(outside)
        value = name(outside)
        return value, (repr(value),)
    return row(id, "log", make, "log")


def model(id: str, build: Callable[[Ctx], Path], fragment: str) -> Any:
    """load_model on a file (or folder) that is no usable model; ModelError names it first."""
    return row(id, "model", lambda c: (build(c), (fragment,)), "model")


def model_folder(c: Ctx) -> Path:
    text(c.folder("diffusers") / "unet" / "config.json", "{}")
    return c.tmp / "diffusers"


def resume(id: str, build: Callable[[Ctx], Path | str], *fragments: str) -> Any:
    def make(c: Ctx) -> Made:
        path = build(c)
        return c.job(network_resume=str(path)), (repr(str(path)), *fragments)
    return row(id, "trainer", make, "network_resume")


TABLE = [
    # -- the data folder --
    data("data-folder-missing", "cli", lambda c: c.tmp / "missing", "does not exist"),
    data("data-folder-empty", "cli", lambda c: c.folder("empty"), "no images"),
    setting("data-folder-not-set", "cli", DATA, "", "no image folder given (got '')"),
    data("data-folder-no-images", "trainer", lambda c: text(c.folder("txt") / "a.txt", "x").parent, "no images"),
    data("data-folder-is-a-file", "trainer", lambda c: c.data / "img0.png", "not a folder"),
    data("data-folder-unreadable", "trainer", unlistable, "cannot be read", "Permission denied"),
    # -- images and captions: alone in their folder, nothing is left to train on --
    data("image-corrupt", "trainer", only(corrupt), "1 unreadable", inside="only.png"),
    data("image-truncated", "trainer", only(truncated), "1 unreadable", inside="only.png"),
    data("image-0-bytes", "trainer", only(empty), "1 unreadable", inside="only.png"),
    data("image-1x1", "trainer", only(dot), "1 under 8 px", inside="only.png"),
    data("image-20000x20000", "trainer", only(bomb), "too large", inside="only.png"),
    data("image-20000x20000-cli", "cli", only(bomb, "b.png"), "decompression bomb", inside="b.png"),
    data("caption-cp1252", "cli", caption("café, naïve".encode("cp1252")), "not UTF-8", inside="a.txt"),
    data("caption-utf16", "trainer", caption("a photo".encode("utf-16")), "not UTF-8", inside="a.txt"),
    # -- Difference / ADDifT / Multi-ADDifT pairs --
    pair("pair-sizes-differ", TARG, None, lambda c: png(c.tmp / "t.png", (48, 32)), "48x32", "64x64"),
    pair("pair-target-missing", TARG, None, lambda c: c.tmp / "gone.png", "does not exist"),
    pair("pair-original-missing", ORIG, lambda c: c.tmp / "gone.png", None, "does not exist"),
    pair("pair-target-not-set", TARG, None, lambda c: "", "no image given (got '')"),
    pair("pair-target-corrupt", TARG, None, lambda c: corrupt(c.tmp / "t.png"), "not a readable image"),
    pair("pair-target-truncated", TARG, None, lambda c: truncated(c.tmp / "t.png"), "not a readable image"),
    pair("pair-1x1", ORIG, lambda c: dot(c.tmp / "o.png"), lambda c: dot(c.tmp / "t.png"), "(got '1x1')",
         named=False),
    pair("pair-target-20000x20000", TARG, None, lambda c: bomb(c.tmp / "t.png"), "too large"),
    pair("pair-20000x20000-pillow-limit-lifted", ORIG, lifted_bombs, lambda c: c.tmp / "t.png",
         "decompression-bomb guard"),
    pair("addift-sizes-differ-cli", TARG, None, lambda c: png(c.tmp / "t.png", (64, 72)), "64x72",
         entry="cli", mode="ADDifT"),
    row("multi-addift-no-target-image", "trainer", multi(None), SUFFIX),
    row("multi-addift-sizes-differ", "trainer", multi((48, 32)), DATA),
    # -- presets --
    preset_file("preset-not-json", "{oops", "not valid JSON"),
    preset_file("preset-not-json-cli", "mode = LoRA", "not valid JSON", entry="cli"),
    preset_file("preset-a-list", '[{"mode": "LoRA"}]', "found a list"),
    preset_file("preset-0-bytes", b"", "not valid JSON"),
    preset_file("preset-not-utf8", '{"save_lora_name": "café"}'.encode("latin-1"), "not UTF-8"),
    preset_file("preset-int-of-5000-digits", '{"train_iterations": ' + "9" * 5000 + "}", "4300 digits"),
    preset_file("preset-nested-too-deep", "[" * 100_000 + "]" * 100_000, "nests too deeply"),
    preset("preset-rank-a-list", "network_rank", "(got [4])", network_rank=[4]),
    preset("preset-bool-not-a-bool", "save_overwrite", "(got 'maybe')", save_overwrite="maybe"),
    preset("preset-lr-nan", "train_learning_rate", "(got nan)", train_learning_rate=float("nan")),
    preset("preset-lr-infinity", "train_learning_rate", "(got inf)", train_learning_rate=float("inf")),
    preset("preset-iterations-negative", "train_iterations", "(got -5)", train_iterations=-5),
    preset("preset-lr-negative", "train_learning_rate", "(got '-1e-4')", train_learning_rate="-1e-4"),
    preset("preset-iterations-1e400", "train_iterations", "(got 1" + "0" * 400 + ")", train_iterations=10**400),
    preset("preset-unknown-optimizer", "train_optimizer", "(got 'Adamm')", train_optimizer="Adamm"),
    preset("preset-unknown-network-type", "network_type", "(got 'lora2')", network_type="lora2"),
    preset("preset-unknown-mode", "mode", "(got 'Dreambooth')", mode="Dreambooth"),
    preset("preset-size-100000", SIZE, "(got '100000')", **{SIZE: "100000"}),
    preset("preset-size-not-multiple-of-8", SIZE, "(got '500,512')", **{SIZE: "500,512"}),
    preset("preset-batch-1e6", "train_batch_size", "(got 1000000)", train_batch_size=1_000_000),
    preset("preset-2nd-pass-a-list", "2nd pass", "(got [])", **{"2nd pass": []}),
    preset("preset-name-lone-surrogate", NAME, "(got '\\ud800')", save_lora_name="\ud800"),
    # -- output and log names --
    setting("name-slash", "cli", NAME, "a/b"),
    setting("name-dotdot", "cli", NAME, ".."),
    setting("name-absolute", "cli", NAME, lambda c: c.tmp / "abs"),
    setting("name-nul", "cli", NAME, "a\x00b"),
    setting("name-reserved-CON", "cli", NAME, "CON"),
    setting("name-reserved-nul.txt", "cli", NAME, "nul.txt"),
    setting("name-backslash", "cli", NAME, "..\\up"),
    setting("name-empty", "cli", NAME, "", "is empty", "(got '')"),
    setting("name-201-chars", "cli", NAME, "x" * 201),
    log("log-dotdot", lambda o: "../outside.csv"),
    log("log-absolute", str),
    log("log-windows-drive", lambda o: "C:\\logs\\x.csv"),
    log("log-nested-escape", lambda o: "20260101/../../outside.csv"),
    log("log-link-out-of-logs", lambda o: "link.csv"),
    # -- model files --
    model("model-text-file", lambda c: text(c.tmp / "notes.safetensors", "hello"), "not a readable"),
    model("model-a-lora-file", lambda c: network_file(c, "a-lora"), "not a Stable Diffusion checkpoint"),
    model("model-ckpt-pickle-runs-code", evil_ckpt, "refused to load this pickle"),
    model("model-pt-bare-pickle-runs-code", lambda c: evil_ckpt(c, raw=True), "refused to load this pickle"),
    model("model-ckpt-garbage", lambda c: text(c.tmp / "junk.ckpt", bytes(range(256))), "not a readable"),
    model("model-ckpt-0-bytes", lambda c: empty(c.tmp / "empty.ckpt"), "not a readable"),
    model("model-unknown-suffix", lambda c: text(c.tmp / "m.onnx", b"\0"), "unknown checkpoint type"),
    model("model-folder-without-index", model_folder, "model_index.json"),
    # -- network_resume --
    resume("resume-rank-differs", lambda c: network_file(c, "r", network_rank=2), "shape"),
    resume("resume-algo-differs", lambda c: network_file(c, "r", network_type="loha"), "the file is loha"),
    resume("resume-blocks-differ", lambda c: network_file(c, "r", network_blocks=["IN01"]), "keys missing"),
    resume("resume-strength-nan", lambda c: network_file(c, "r", strength="nan"), "finite"),
    resume("resume-not-safetensors", lambda c: text(c.tmp / "r.safetensors", "x"), "not a readable"),
    resume("resume-missing", lambda c: "no-such-net", "no such file"),
    # -- optimizer and scheduler settings, step rules --
    setting("optimizer-unknown-key", "cli", OPT, "weight_decayy=0.1", "'weight_decayy=0.1'", "does not take"),
    setting("optimizer-lr-key", "trainer", OPT, "lr=1"),
    setting("optimizer-value-not-a-number", "trainer", OPT, "weight_decay=abc"),
    setting("optimizer-no-equals", "cli", OPT, "weight_decay", "expected key=value (got 'weight_decay')"),
    setting("optimizer-unhashable-literal", "cli", OPT, "betas={[]: 1}"),
    setting("optimizer-int-of-401-digits", "trainer", OPT, "weight_decay=1" + "0" * 400),
    setting("optimizer-betas-one-number", "trainer", OPT, "betas=(0.9,)"),
    setting("scheduler-unknown-key", "trainer", SCHED, "eta_minn=0"),
    setting("scheduler-step-size-infinite", "trainer", SCHED, "step_size=1e999", "'step_size=inf'",
            train_lr_scheduler="step"),
    *[setting(f"step-rules-{id}", "cli" if id == "decreasing" else "trainer", RULES, r,
              train_lr_scheduler="piecewise_constant")
      for id, r in [("decreasing", "1:100,0.5:50,0.1"), ("not-a-number", "1:10,abc"), ("no-final", "1:100"),
                    ("negative", "-1:10,0.1"), ("step-not-whole", "1:1.5,0.1"), ("missing", "")]],
    # -- cross-field checks --
    setting("timesteps-min-above-max", "trainer", "train_min_timesteps", "900", "(got 900)", train_max_timesteps=500),
]
