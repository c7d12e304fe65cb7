"""The evaluation grid: every saved file of a run at several LoRA strengths, for a few prompts.

One PNG, ``<final file's name>_grid.png`` next to the LoRA: a block per prompt, stacked
top to bottom; in each block the saved files (intermediate saves in order, the final
one last) down the left and the strengths across the top. Every cell of a prompt is
drawn with the same seed (``eval_grid_seed + prompt index``), so its cells differ only
by file and strength; strength 0 is the plain model. Images larger than CELL_MAX
px on their long side are shrunk to it in the grid. A strength is the weight the file
is used at in a WebUI (``<lora:name:weight>``): a strength baked in at save
(network_strength) counts, as it does there. The grid's geometry and labels are kept
in the PNG as a text chunk (GRID_KEY), which lets the UI tell a grid from samples.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from . import devices
from .events import JobStopped
from ..config.options.grid import EMPTY_PROMPT
from .outputs import save_steps
from .samples import render_samples, save_png

if TYPE_CHECKING:
    from .engine import RunResult, Trainer
    from ..modes.base import PassSpec

log = logging.getLogger(__name__)

__all__ = ["GRID_KEY", "GridLayout", "cell_size", "grid_layout", "grid_rows", "read_grid_info", "render_grid"]

GRID_KEY = "traindeck_grid"
PAD = 4
LABEL_MIN, LABEL_MAX = 64, 320  # px of the left margin (row labels)
CELL_MAX = 512  # px, long side of a cell: a grid of SDXL images stays a size viewers open
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes: a title line and a strength header above each block's cells."""

    cell_w: int
    cell_h: int
    rows: int
    cols: int
    blocks: int
    label_w: int   # left margin: file and step of each row
    title_h: int   # the prompt of a block
    header_h: int  # the strengths

    @property
    def block_h(self) -> int:
        return self.title_h + self.header_h + self.rows * self.cell_h

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid."""
        return self.label_w + self.cols * self.cell_w, self.blocks * self.block_h

    def cell_origin(self, block: int, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel of one cell."""
        top = block * self.block_h + self.title_h + self.header_h
        return self.label_w + col * self.cell_w, top + row * self.cell_h


def cell_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of a cell: the image, shrunk to CELL_MAX px on its long side if larger."""
    scale = min(1.0, CELL_MAX / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    # The bitmap default font of older Pillow draws Latin-1 only (it raises on anything else).
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with '...' to fit `width` px."""
    text = _drawable(text, font)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def row_labels(rows: list[tuple[Path, int]]) -> list[tuple[str, str]]:
    """(step line, file line) of each row."""
    return [(f"{step} steps", path.stem) for path, step in rows]


def grid_layout(cell: tuple[int, int], rows: list[tuple[Path, int]], cols: int, blocks: int) -> GridLayout:
    """The geometry for cells of (width, height) `cell`; the label margin fits the row labels."""
    font = _font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = font.getbbox("Ag")[3] + PAD
    widest = max(draw.textlength(_drawable(t, font), font=font) for pair in row_labels(rows) for t in pair)
    label_w = int(min(LABEL_MAX, max(LABEL_MIN, widest + 2 * PAD)))
    return GridLayout(cell_w=cell[0], cell_h=cell[1], rows=len(rows), cols=cols, blocks=blocks, label_w=label_w,
                      title_h=line + PAD, header_h=line)


def _labels(canvas: Image.Image, layout: GridLayout, rows: list[tuple[Path, int]], strengths: list[float],
            prompts: list[str], seed: int) -> None:
    """Prompt titles, strength headers and row labels."""
    draw, font = ImageDraw.Draw(canvas), _font()
    line = layout.header_h
    for b, prompt in enumerate(prompts):
        top = b * layout.block_h
        title = f"seed {seed + b} | {prompt or EMPTY_PROMPT}"
        draw.text((PAD, top + PAD // 2), _fit(draw, title, font, canvas.width - 2 * PAD), fill=INK, font=font)
        _, y = layout.cell_origin(b, 0, 0)
        draw.text((PAD, y - line), _fit(draw, "strength:", font, layout.label_w - 2 * PAD), fill=INK, font=font)
        for c, strength in enumerate(strengths):
            x, _ = layout.cell_origin(b, 0, c)
            draw.text((x + PAD, y - line), _fit(draw, f"{strength:g}", font, layout.cell_w - PAD), fill=INK, font=font)
        for r, (step_text, file_text) in enumerate(row_labels(rows)):
            _, y = layout.cell_origin(b, r, 0)
            for k, text in enumerate((step_text, file_text)):
                draw.text((PAD, y + PAD + k * line), _fit(draw, text, font, layout.label_w - 2 * PAD),
                          fill=INK, font=font)


def _pass_files(spec: "PassSpec") -> dict[str, int]:
    """File name -> step of every file a pass saves (the names outputs.plan_outputs gives)."""
    c = spec.cfg
    base = f"{c.save_lora_name}{spec.suffix}"
    files = {f"{base}_{s}steps.safetensors": s for s in save_steps(c.train_iterations, c.save_per_steps)}
    files[f"{base}.safetensors"] = c.train_iterations
    return files


def grid_rows(specs: list["PassSpec"], saved: list[Path]) -> tuple["PassSpec", list[tuple[Path, int]]]:
    """The pass the result comes from (the one that saved the last file) and its files with their steps.

    Difference's copier, when it is saved too, is left out: its difference file is shown alone.
    Files that are not a pass's network (none today) are passed over rather than guessed at.
    """
    for last in reversed(saved):
        for spec in specs:
            files = _pass_files(spec) if spec.save else {}
            if last.name in files:
                return spec, [(p, files[p.name]) for p in saved if p.name in files]
    raise ValueError(f"evaluation grid: none of {[p.name for p in saved]} is a network file of this job's passes")


def _load(bundle, cfg, path: Path, device: torch.device, seed: int):
    """A saved file hooked into the bundle (multiplier 1: its own, unbaked weights)."""
    from ..networks.network import Network

    with devices.seeded(seed, device):  # the random initialisation is replaced, but must not move the host's RNG
        network = Network.build(bundle, cfg)
    try:
        network.load_weights(path)
        network.to(device)
    except BaseException:
        network.remove()
        raise
    return network


def _cells(trainer: "Trainer", bundle, spec: "PassSpec", rows: list[tuple[Path, int]], strengths: list[float],
           draw_row: Callable[[list[Image.Image], int, int], None], render: Callable[[], list[Image.Image]]) -> None:
    """Render every cell, row by row; strength 0 is the plain model, drawn once."""
    plain = render() if 0.0 in strengths else None
    for r, (path, _) in enumerate(rows):
        trainer.emit(message=f"evaluation grid: {path.name} ({r + 1}/{len(rows)})")
        network = _load(bundle, spec.cfg, path, trainer.device, trainer.cfg.eval_grid_seed)
        try:
            for c, strength in enumerate(strengths):
                if trainer.stop.requested:
                    raise JobStopped()
                if strength == 0.0:
                    images = plain
                else:
                    # load_weights undid the baked strength; a WebUI applies the file with it
                    network.set_multiplier(strength * spec.cfg.network_strength)
                    images = render()
                draw_row(images, r, c)
        finally:
            network.remove()


def render_grid(trainer: "Trainer", bundle, specs: list["PassSpec"], result: "RunResult") -> None:
    """Render, write and announce the grid of a finished run (the engine calls this after its passes)."""
    cfg = trainer.cfg
    spec, rows = grid_rows(specs, result.saved)
    strengths, prompts = cfg.grid_strengths(), cfg.grid_prompts()
    height, width = (int(v) for v in cfg.image_size)
    layout = grid_layout(cell_size(width, height), rows, len(strengths), len(prompts))
    canvas = Image.new("RGB", layout.size, BACKGROUND)

    def render() -> list[Image.Image]:
        return render_samples(bundle, prompts, negative_prompt=cfg.negative_prompt, steps=cfg.sample_steps,
                              size=(height, width), seed=cfg.eval_grid_seed, device=trainer.device)

    def draw_row(images: list[Image.Image], r: int, c: int) -> None:
        for b, image in enumerate(images):
            if image.size != (layout.cell_w, layout.cell_h):
                image = image.resize((layout.cell_w, layout.cell_h), Image.LANCZOS)
            canvas.paste(image, layout.cell_origin(b, r, c))

    try:
        _cells(trainer, bundle, spec, rows, strengths, draw_row, render)
    except torch.OutOfMemoryError:
        # the trained files are saved: a grid that does not fit must not fail the job
        devices.empty_cache(trainer.device)
        _announce(trainer, result, "evaluation grid skipped: out of memory (lower eval_grid's prompts or "
                                   "strengths, sample_steps or the image size)", warn=True)
        return
    _labels(canvas, layout, rows, strengths, prompts, cfg.eval_grid_seed)
    info = {"prompts": prompts, "strengths": strengths, "files": [p.name for p, _ in rows],
            "steps": [s for _, s in rows], "seed": cfg.eval_grid_seed, "layout": asdict(layout)}
    path = write_grid(canvas, rows[-1][0].parent / f"{rows[-1][0].stem}_grid.png", info, cfg.save_overwrite)
    _announce(trainer, result, f"evaluation grid {path}", samples=[str(path)])


def _announce(trainer: "Trainer", result: "RunResult", note: str, warn: bool = False, **changes: Any) -> None:
    """Log `note`, add it to the job's final message and send it as progress."""
    (log.warning if warn else log.info)("%s", note)
    result.message = f"{result.message}; {note}" if result.message else note
    trainer.emit(message=note, **changes)


def write_grid(image: Image.Image, wanted: Path, info: dict[str, Any], overwrite: bool) -> Path:
    """Write the PNG with its description; a taken name gets `-2`, `-3`… unless `overwrite`."""
    png = PngInfo()
    png.add_text(GRID_KEY, json.dumps(info))
    return save_png(image, wanted, overwrite=overwrite, field="eval_grid", pnginfo=png)


def read_grid_info(path: Path | str) -> dict[str, Any] | None:
    """The description of a grid PNG; None for any other image (or a file that is gone)."""
    path = Path(path)
    if path.suffix.lower() != ".png" or not path.is_file():
        return None
    with Image.open(path) as im:
        text = im.info.get(GRID_KEY)
    return json.loads(text) if text else None
