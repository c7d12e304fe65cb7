"""Sample images from the model being trained, through a diffusers pipeline.

The pipeline is assembled from the bundle's own modules (nothing is copied), so
a hooked-in network shows in the images at whatever multiplier it has when
`render_samples` is called: pick one with ``network.scaled(m)`` or
``network.disabled()`` around the call. Used for `sample_every_n_steps` /
`sample_prompts` during training, the iLECO previews and the evaluation grid.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from PIL import Image

from . import devices
from ..families.bundle import ModelBundle
from ..fsutil import atomic_path, check_name, unique_path
from ..families.textenc import encode_prompts

__all__ = ["SAMPLERS", "build_pipeline", "check_size", "native_size", "parse_prompts", "render_samples",
           "save_png", "save_samples"]

SAMPLERS = ("ddim", "euler")
SIZE_MULTIPLE = 8  # the pipelines refuse other sizes (one latent cell is 8 px)


def parse_prompts(text: str | Sequence[str]) -> list[str]:
    """One prompt per non-empty line, stripped (a list, as a JSON preset may hold, works too)."""
    items = [text] if isinstance(text, str) else list(text)
    return [line.strip() for item in items for line in str(item).splitlines() if line.strip()]


def native_size(bundle: ModelBundle) -> tuple[int, int]:
    """(height, width) the model was trained at: 512 for SD1, 768 for SD2-768, 1024 for SDXL."""
    side = bundle.family.native_size(bundle)
    return side, side


def check_size(size: Sequence[int]) -> tuple[int, int]:
    """(height, width) as ints; ValueError unless both are multiples of 8 and at least 8."""
    try:
        height, width = size
        ok = all(int(v) == v for v in (height, width))
    except (TypeError, ValueError):
        raise ValueError(f"sample size {size!r}: expected (height, width)") from None
    if not ok or min(height, width) < SIZE_MULTIPLE or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ValueError(f"sample size {height}x{width} (height x width): each side must be a whole "
                         f"multiple of {SIZE_MULTIPLE} px and at least {SIZE_MULTIPLE} px")
    return int(height), int(width)


def build_pipeline(bundle: ModelBundle, *, sampler: str = "ddim"):
    """The family's diffusers pipeline holding the bundle's own modules (no copies), with the
    family's sampling scheduler made from the training schedule."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    family = bundle.family
    pipe = family.pipeline(bundle, family.sampling_scheduler(bundle.noise_scheduler, sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


@contextlib.contextmanager
def _placed(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> Iterator[None]:
    """`module` on `device` (and floating tensors in `dtype`) inside; exactly as before afterwards.

    The original tensors are put back rather than moved back: no rounding, and
    storage a host shares with the bundle stays shared instead of being duplicated.
    """
    def fits(t: torch.Tensor) -> bool:
        return t.device == device and (dtype is None or not t.is_floating_point() or t.dtype == dtype)

    if all(fits(t) for t in _tensors(module)):
        yield
        return
    # .to() may swap a Parameter's data or replace the Parameter itself: undo both
    params = [(m, name, p, p.data) for m in module.modules() for name, p in m.named_parameters(recurse=False)]
    buffers = [(m, name, b) for m in module.modules() for name, b in m.named_buffers(recurse=False)]
    try:
        module.to(device=device, dtype=dtype)
        yield
    finally:
        for m, name, p, data in params:
            p.data = data
            setattr(m, name, p)
        for m, name, b in buffers:
            setattr(m, name, b)


@contextlib.contextmanager
def _sampling_state(bundle: ModelBundle, device: torch.device, vae_dtype: torch.dtype) -> Iterator[None]:
    """Every module in eval mode on `device`; modes, requires_grad and placement restored after."""
    modules = bundle.modules()
    modes = [(m, m.training) for module in modules for m in module.modules()]
    grads = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        with contextlib.ExitStack() as stack:
            for module in modules:
                module.eval()  # no dropout in samples
                stack.enter_context(_placed(module, device, vae_dtype if module is bundle.vae else None))
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def _vae_dtype(vae) -> torch.dtype:
    dtype = next(vae.parameters()).dtype
    # fp16 SD/SDXL VAEs overflow to NaN when decoding; diffusers upcasts them the same way
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def _embeds(bundle: ModelBundle, prompt: str, negative: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Pipeline keyword arguments for one prompt, encoded the way training encodes captions."""
    # Encoded together so both get the same number of 75-token chunks (the pipelines need equal shapes).
    cond = encode_prompts(bundle, [prompt, negative]).to(device, dtype)
    return bundle.family.pipeline_embeds(cond)


def _decode(pipe, bundle: ModelBundle, latents: torch.Tensor) -> Image.Image:
    vae = bundle.vae
    param = next(vae.parameters())
    z = latents.to(param.device, param.dtype) / bundle.vae_scale + bundle.vae_shift
    pixels = vae.decode(z).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]


def render_samples(bundle: ModelBundle, prompts: Iterable[str], *, negative_prompt: str = "", steps: int = 20,
                   size: tuple[int, int] | None = None, seed: int = 0, guidance: float = 7.0,
                   device: torch.device, sampler: str = "ddim") -> list[Image.Image]:
    """One image per prompt, (height, width) = `size` (default: the model's native size).

    Prompt i is drawn with seed ``seed + i``, so a prompt's image is reproducible.
    The network hooked into the bundle shows at its multiplier at call time (use
    ``network.scaled(m)`` / ``network.disabled()`` around the call); a network must
    already be on `device`. Modules elsewhere are moved there for the call (the VAE
    of a training job lives on the CPU) and put back after; training mode and
    requires_grad are restored too. The global RNG is left as it was.
    """
    height, width = check_size(native_size(bundle) if size is None else size)
    if int(steps) < 1:
        raise ValueError(f"steps: expected at least 1, got {steps!r}")
    prompts = list(prompts)
    if not prompts:
        return []
    device = torch.device(device)
    images = []
    with torch.no_grad(), _sampling_state(bundle, device, _vae_dtype(bundle.vae)), devices.seeded(seed, device):
        pipe = build_pipeline(bundle, sampler=sampler)
        unet_dtype = next(bundle.unet.parameters()).dtype
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(device).manual_seed(int(seed) + i)
            with devices.autocast(device, unet_dtype):  # the dtypes training runs the model in
                embeds = _embeds(bundle, prompt, negative_prompt, device, unet_dtype)
                latents = pipe(height=height, width=width, num_inference_steps=int(steps),
                               guidance_scale=float(guidance), generator=generator, output_type="latent",
                               **embeds).images
            latents = bundle.family.pipeline_latents(latents, height, width)
            images.append(_decode(pipe, bundle, latents))  # outside autocast: the VAE in its own dtype
    return images


def save_png(image: Image.Image, wanted: Path, *, overwrite: bool = False, field: str = "sample image",
             pnginfo: Any = None) -> Path:
    """Write `image` as PNG atomically at `wanted`, or at `-2`, `-3`… when taken (unless `overwrite`)."""
    wanted = Path(wanted)
    if overwrite:
        with atomic_path(wanted, overwrite=True, field=field) as tmp:
            image.save(tmp, format="PNG", pnginfo=pnginfo)
        return wanted
    for _ in range(100):  # another writer may take the free name between looking and renaming
        path = unique_path(wanted)
        try:
            with atomic_path(path, overwrite=False, field=field) as tmp:
                image.save(tmp, format="PNG", pnginfo=pnginfo)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{field}: no free name for {wanted}")


def save_samples(images: Sequence[Image.Image], folder: Path | str, stem: str) -> list[Path]:
    """Write `<stem>_<i>.png` into `folder` atomically; a taken name gets a `-2`, `-3`… suffix."""
    check_name("sample file name", f"{stem}_0.png")
    folder = Path(folder)
    return [save_png(image, folder / f"{stem}_{i}.png") for i, image in enumerate(images)]
