"""Tensors of a kohya/A1111 network file: algorithm detection, baked strength, resume checks."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..config.params import ConfigError

# The two factors of each algorithm's delta that it is linear in, one each:
# scaling both by sqrt(|s|) (and one by the sign) scales the delta by s.
_FACTORS = {
    "lora": (("lora_up.weight",), ("lora_down.weight",)),
    "loha": (("hada_w1_a",), ("hada_w2_a",)),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
}
_MARKERS = {"lora_down.weight": "lora", "hada_w1_a": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr"}
ALGO_TYPES = {"lora": "lierla/c3lier", "loha": "loha", "lokr": "lokr"}


def split_key(key: str) -> tuple[str, str]:
    """'lora_unet_x.lora_up.weight' -> ('lora_unet_x', 'lora_up.weight')."""
    module, _, tensor = key.partition(".")
    return module, tensor


def module_algos(sd: dict[str, Tensor]) -> dict[str, str]:
    """Module name -> 'lora' | 'loha' | 'lokr', judged by the tensors it has."""
    found: dict[str, str] = {}
    for key in sd:
        module, tensor = split_key(key)
        if tensor in _MARKERS:
            found[module] = _MARKERS[tensor]
    return found


def file_algo(sd: dict[str, Tensor]) -> str:
    """The network type(s) a state dict holds, as users name them (with '+DoRA')."""
    algos = sorted({ALGO_TYPES[a] for a in module_algos(sd).values()})
    text = "+".join(algos) if algos else "none"
    return text + ("+DoRA" if any(k.endswith(".dora_scale") for k in sd) else "")


def scale_strength(sd: dict[str, Tensor], strength: float) -> dict[str, Tensor]:
    """A copy of `sd` whose every module's delta is `strength` times as large.

    DoRA renormalises the merged weight, so no tensor scaling multiplies its
    effect; it is refused rather than written wrong.
    """
    if strength == 1.0:
        return dict(sd)
    if any(k.endswith(".dora_scale") for k in sd):
        raise ConfigError("network_strength", strength,
                          "a DoRA file cannot bake a strength other than 1; apply it as the LoRA weight instead")
    root = math.sqrt(abs(strength))
    sign = -1.0 if strength < 0 else 1.0
    out = dict(sd)
    for module, algo in module_algos(sd).items():
        first, second = _FACTORS[algo]
        for names, factor in ((first, sign * root), (second, root)):
            key = next(f"{module}.{n}" for n in names if f"{module}.{n}" in sd)
            out[key] = sd[key] * factor
    return out


def check_resume(path: Path | str, file_sd: dict[str, Tensor], net_sd: dict[str, Tensor]) -> None:
    """Refuse a resume file whose algorithm, keys, shapes or alphas differ from the network."""
    have, want = file_algo(file_sd), file_algo(net_sd)
    if have != want:
        raise ConfigError("network_resume", str(path), f"the file is {have}, the network is {want}")
    missing = sorted(set(net_sd) - set(file_sd))
    extra = sorted(set(file_sd) - set(net_sd))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
        raise ConfigError("network_resume", str(path),
                          "; ".join(parts) + ": the layers differ (network type, blocks, elements or text encoder)")
    for key, tensor in net_sd.items():
        got = file_sd[key]
        if tuple(got.shape) != tuple(tensor.shape):
            raise ConfigError("network_resume", str(path),
                              f"{key} has shape {tuple(got.shape)}, the network needs {tuple(tensor.shape)}"
                              " (rank or conv rank differ)")
        if key.endswith(".alpha") and not torch.allclose(got.float(), tensor.float(), rtol=1e-3):
            raise ConfigError("network_resume", str(path),
                              f"{key} is {got.item():g}, the network's alpha is {tensor.item():g}")
