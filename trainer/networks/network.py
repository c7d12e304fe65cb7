"""The trained network: LoRA/LoCon/LoHa/LoKr (and DoRA) through lycoris-lora,
saved with kohya/A1111 key names that A1111, Forge, ComfyUI and diffusers load.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import contextlib
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..families.blocks import block_id
from ..training.devices import DTYPES
from ..fsutil import atomic_path
from .metadata import STRENGTH_KEY, build_metadata
from .build import NetworkSpec, create_lycoris, quiet_lycoris
from .fastpath import skip_unit_scalar
from .file import check_resume, scale_strength
from .groups import TE, UNET, GroupPlan, build_groups, frozen_params
from ..config.params import ConfigError

if TYPE_CHECKING:
    from ..families.base import Family

log = logging.getLogger(__name__)

__all__ = ["Network", "NetworkSpec", "block_id", "build_metadata"]


def _drop_plain_forward(module: torch.nn.Module) -> None:
    """Remove the instance-level ``forward`` LyCORIS leaves behind once no wrapper is left.

    It is the class's own forward bound to the module; deleting it makes the
    module exactly as it was. A forward patched in by someone else stays.
    """
    if "_lycoris_wrappers" in module.__dict__:
        return
    fwd = module.__dict__.get("forward")
    if getattr(fwd, "__self__", None) is module and getattr(fwd, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]


class Network:
    """A LyCORIS network hooked into a ModelBundle's U-Net and text encoder(s)."""

    def __init__(self, lyco, spec: NetworkSpec, family: Family, plan: GroupPlan | None = None,
                 file_names: dict[str, str] | None = None):
        self.lyco = lyco
        self.spec = spec
        self.family = family
        self.plan = plan or GroupPlan()
        # in-memory kohya module name -> the name written to files, where they differ
        self.file_names = dict(file_names or {})
        self._memory_names = {v: k for k, v in self.file_names.items()}
        self._multiplier = 1.0
        self._attached = True
        self._removed = False

    # ---- construction ------------------------------------------------------
    @classmethod
    def build(cls, bundle, cfg, *, train_text_encoder: bool | None = None) -> "Network":
        """Build and hook in the network, on the U-Net's current device in cfg.train_lora_precision.

        Move the models first, or call to() after moving them: the network is not their submodule.
        """
        spec = NetworkSpec.from_config(cfg, train_text_encoder, bundle.family)
        lyco = create_lycoris(bundle, spec)
        if not lyco.unet_loras and not lyco.text_encoder_loras:
            raise ConfigError("network_blocks", list(spec.blocks),
                              f"selects no trainable layer of this {bundle.family} model "
                              f"(element {spec.element}, text encoder {'on' if spec.with_text_encoder else 'off'})")
        with quiet_lycoris():
            lyco.apply_to(None, None, apply_text_encoder=bool(lyco.text_encoder_loras), apply_unet=True)
        skip_unit_scalar(lyco)
        device = next(bundle.unet.parameters()).device
        dtype = DTYPES[cfg.train_lora_precision]
        lyco.to(device=device)
        with torch.no_grad():
            # Parameters only: alpha buffers stay fp32 so alpha/rank is exact in the file.
            for param in lyco.parameters():
                param.data = param.data.to(dtype)
        renames = bundle.family.file_names(bundle, [m.lora_name for m in lyco.unet_loras])
        net = cls(lyco, spec, bundle.family, GroupPlan.from_config(cfg, bundle.family), renames)
        for param in frozen_params(net.plan, bundle.family, net._parts()):
            param.requires_grad_(False)  # a block of learning-rate weight 0 never trains
        log.info("network %s: %d U-Net and %d text-encoder modules, %d parameters",
                 cfg.network_type, len(lyco.unet_loras), len(lyco.text_encoder_loras), net.n_params)
        return net

    # ---- inspection --------------------------------------------------------
    @property
    def unet_modules(self) -> list:
        return list(self.lyco.unet_loras)

    @property
    def text_encoder_modules(self) -> list:
        return list(self.lyco.text_encoder_loras)

    @property
    def trains_text_encoder(self) -> bool:
        """True when the network has text-encoder modules (captions must then be encoded per step)."""
        return bool(self.lyco.text_encoder_loras)

    def module_names(self) -> list[str]:
        """kohya names of every module (``lora_unet_...``, ``lora_te_...``)."""
        return [m.lora_name for m in self.lyco.loras]

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.lyco.parameters()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.lyco.parameters())

    def _parts(self) -> list[tuple[str, list]]:
        return [(UNET, list(self.lyco.unet_loras)), (TE, list(self.lyco.text_encoder_loras))]

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict]:
        """Optimizer groups: U-Net's, then the text encoder(s)', each only if it has params.

        LoRA+ puts lora_up matrices in "<part>_up" groups at ratio x lr; a block
        whose learning-rate weight is not 1 gets its own "unet_<ID>" group, and one
        of weight 0 is left out while the U-Net trains. With both rates 0 every
        parameter is in the groups (that is how a pass freezes the network).
        """
        lrs = {UNET: unet_lr, TE: te_lr}
        return build_groups(self.plan, self.family, [(part, mods, lrs[part]) for part, mods in self._parts()])

    def to(self, device: torch.device | str) -> "Network":
        """Move the network next to the model (dtypes kept, the same Parameter objects).

        The network is not a submodule of the U-Net: moving the models does not move it.
        """
        self.lyco.to(device=torch.device(device))
        return self

    def train(self, mode: bool = True) -> "Network":
        self.lyco.train(mode)
        return self

    # ---- multiplier --------------------------------------------------------
    @property
    def multiplier(self) -> float:
        return self._multiplier

    def set_multiplier(self, m: float) -> None:
        """Scale the network's effect. 0 unhooks it: the model runs untouched (exact and free)."""
        self._multiplier = float(m)
        for module in self.lyco.loras:
            module.multiplier = self._multiplier
        if self._removed:
            return
        if self._multiplier == 0.0:
            self._detach()
        else:
            self._attach()

    @contextmanager
    def scaled(self, m: float) -> Iterator[None]:
        """The network at multiplier `m` inside; the previous multiplier comes back afterwards."""
        previous = self._multiplier
        self.set_multiplier(m)
        try:
            yield
        finally:
            self.set_multiplier(previous)

    def disabled(self) -> "contextlib.AbstractContextManager[None]":
        """Base-model predictions inside (the modules are unhooked, so exactly the frozen model)."""
        return self.scaled(0.0)

    def _attach(self) -> None:
        if not self._attached:
            for module in self.lyco.loras:
                module.apply_to()
            self._attached = True

    def _detach(self) -> None:
        if self._attached:
            for module in reversed(self.lyco.loras):
                module.restore()
                _drop_plain_forward(module.org_module[0])
            self._attached = False

    def remove(self) -> None:
        """Unhook for good: the bundle's modules are as they were before build()."""
        self._detach()
        self._removed = True

    # ---- files -------------------------------------------------------------
    def _renamed(self, sd: dict[str, Tensor], names: dict[str, str]) -> dict[str, Tensor]:
        out = {}
        for key, value in sd.items():
            module, dot, tensor = key.partition(".")
            out[names.get(module, module) + dot + tensor] = value
        return out

    def file_module_names(self) -> list[str]:
        """Module names as files hold them (original-model layout for SDXL's U-Net, fused for FLUX)."""
        return list(dict.fromkeys(k.partition(".")[0] for k in self.state_dict_kohya()))

    def state_dict_kohya(self, dtype: torch.dtype | None = None, strength: float = 1.0) -> dict[str, Tensor]:
        """Tensors under the names files use, on the CPU; `strength` is baked into the deltas."""
        with torch.no_grad():
            raw = {k: v.detach() for k, v in self.lyco.state_dict().items()}
        scaled = self.family.to_file(self._renamed(scale_strength(raw, float(strength)), self.file_names))
        out = {}
        for key, value in scaled.items():
            value = value.to(device=torch.device("cpu"))
            if key.endswith(".alpha"):
                value = value.float()  # alpha/rank must stay exact whatever the save precision
            elif dtype is not None:
                value = value.to(dtype)
            out[key] = value.contiguous()
        return out

    def save(self, path: Path | str, *, dtype: torch.dtype, metadata: dict[str, str],
             overwrite: bool = False, strength: float = 1.0) -> Path:
        """Write a .safetensors file atomically; an existing file is refused unless `overwrite`."""
        meta = {**metadata, STRENGTH_KEY: repr(float(strength))}
        bad = sorted(k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str))
        if bad:
            raise TypeError(f"metadata values must be strings; not for {', '.join(map(str, bad))}")
        tensors = self.state_dict_kohya(dtype, strength)
        with atomic_path(path, overwrite=overwrite, field="save_lora_name") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    def load_weights(self, path: Path | str) -> None:
        """Resume from a file this network could have saved; anything else is refused."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("network_resume", str(path), "file not found")
        try:
            file_sd = load_file(str(path))
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError("network_resume", str(path), f"is not a readable .safetensors file ({exc})") from exc
        # Files written before SDXL keys moved to the original layout hold in-memory names: both load.
        file_sd = self._renamed(file_sd, self.file_names)
        check_resume(path, file_sd, self.state_dict_kohya())
        try:
            strength = float(meta.get(STRENGTH_KEY, "1.0"))
        except ValueError:
            raise ConfigError("network_resume", str(path), f"has an unreadable {STRENGTH_KEY} entry") from None
        if strength == 0.0:
            raise ConfigError("network_resume", str(path), "was saved with network_strength 0; nothing to resume")
        if not math.isfinite(strength):
            raise ConfigError("network_resume", str(path), f"has {STRENGTH_KEY} {strength}; it must be a finite number")
        file_sd = scale_strength(file_sd, 1.0 / strength)  # undo the strength baked in at save
        shapes = {k: v.shape for k, v in self._renamed(self.lyco.state_dict(), self.file_names).items()}
        file_sd = self.family.from_file(file_sd, shapes)
        self.lyco.load_state_dict(self._renamed(file_sd, self._memory_names), strict=True)
