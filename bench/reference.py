"""P2's reference: a train_text_to_image_lora-style loop with peft LoRA, written from the libraries' APIs.

Each step does what that style of script does: the VAE encodes the image
(``latent_dist.sample() * scaling_factor``), the frozen text encoder encodes the
caption, noise and a timestep are drawn, the U-Net predicts the noise, MSE,
backward and an AdamW step on the trainable (LoRA) parameters. Images are read
and tokenized once (a data loader's work, left out of the step), which only
favours the reference.

Two variants train on separate copies of the same U-Net:
``attention``: peft on to_q/to_k/to_v/to_out.0 (the script's choice), fewer
layers than the trainer's lierla; ``same``: peft on exactly the layers the
trainer's lierla network covers, with the same rank and alpha.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

ATTENTION_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def peft_missing() -> str | None:
    """Why peft cannot be used here, or None when it can."""
    try:
        import peft  # noqa: F401
        from peft import LoraConfig  # noqa: F401
    except ImportError as err:
        return (f"peft is not importable ({err}); install it in a separate environment, "
                "see requirements/bench.txt")
    return None


def with_peft_lora(pristine: nn.Module, rank: int, alpha: float, targets: list[str]) -> tuple[nn.Module, list]:
    """A copy of the frozen U-Net with a peft LoRA adapter; (U-Net, its trainable parameters)."""
    from peft import LoraConfig

    unet = copy.deepcopy(pristine).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"peft found no layer among {len(targets)} targets")
    return unet, params


def load_pixels(folder: Path) -> tuple[list[Tensor], list[str]]:
    """Every PNG in `folder` as a (1, 3, H, W) tensor in [-1, 1], with its caption."""
    pixels, captions = [], []
    for png in sorted(folder.glob("*.png")):
        arr = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        pixels.append(torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous())
        captions.append(png.with_suffix(".txt").read_text(encoding="utf-8").strip())
    if not pixels:
        raise RuntimeError(f"no images in {folder}")
    return pixels, captions


class Reference:
    """The reference loop over one peft U-Net; `segment(steps, seed)` times its steps.

    On an accelerator the frozen models sit on `device` in their own dtype, the step runs
    under `autocast` (a context factory) with a grad scaler for fp16, as the script does
    with mixed precision; the loss is read back each step (the script logs it).
    """

    def __init__(self, bundle, unet: nn.Module, params: list, folder: Path, lr: float,
                 device: torch.device | None = None, autocast=contextlib.nullcontext):
        self.vae, self.te, self.unet = bundle.vae, bundle.text_encoders[0], unet
        self.sched = bundle.noise_scheduler
        self.device = device or torch.device("cpu")
        self.autocast = autocast
        self.scaling = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        dtype = next(self.vae.parameters()).dtype
        pixels, captions = load_pixels(folder)
        self.pixels = [x.to(self.device, dtype) for x in pixels]
        tok = bundle.tokenizers[0]
        self.ids = [tok([c], padding="max_length", max_length=tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device) for c in captions]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=lr)
        fp16 = next(p for p in unet.parameters() if not p.requires_grad).dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.n_params = sum(p.numel() for p in params)

    def step(self, index: int, gen: torch.Generator) -> Tensor:
        k = index % len(self.pixels)
        with torch.no_grad():
            latents = self.vae.encode(self.pixels[k]).latent_dist.sample(generator=gen) * self.scaling
            hidden = self.te(self.ids[k], return_dict=False)[0]
        noise = torch.randn(latents.shape, generator=gen, device=self.device, dtype=latents.dtype)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (latents.shape[0],), generator=gen,
                          device=self.device)
        noisy = self.sched.add_noise(latents, noise, t)
        with self.autocast():
            pred = self.unet(noisy, t, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def segment(self, steps: int, seed: int) -> tuple[list[float], list[float]]:
        """(wall, process-CPU) seconds of each of `steps` steps."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.unet.train()
        wall, cpu = [], []
        for i in range(steps):
            tick, tock = time.perf_counter(), time.process_time()
            loss = float(self.step(i, gen))
            wall.append(time.perf_counter() - tick)
            cpu.append(time.process_time() - tock)
            if not math.isfinite(loss):
                raise RuntimeError(f"reference loss is {loss} at step {i + 1}")
        self.unet.eval()
        return wall, cpu
