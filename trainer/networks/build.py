"""Building a LyCORIS network (lycoris-lora's kohya flavour) for one ModelBundle.

LyCORIS keeps its targets in class attributes of LycorisNetworkKohya, so a
build sets them, constructs, and puts the previous values back, all under one
lock. Block and element filters go through LyCORIS's own ``is_excluded`` hook
(a predicate per module path) rather than thousands of exclude regexes.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from lycoris.kohya import LycorisNetworkKohya
from lycoris.logging import logger as lycoris_logger

from ..config.params import ConfigError

ALGOS = {"lierla": "lora", "c3lier": "locon", "loha": "loha", "lokr": "lokr"}
# conv_in, conv_out and time_embedding are never targets: diffusers 0.31 drops
# their keys on load (only an "unexpected keys" warning), so files would not
# round-trip. They are not inside any targeted class, and no names are targeted.
_PRESET_ATTRS = (
    "ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME",
)
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class NetworkSpec:
    """What to build, resolved from a TrainConfig."""

    network_type: str
    rank: int
    alpha: float
    conv_rank: int
    conv_alpha: float
    dora: bool
    blocks: tuple[str, ...]
    element: str
    train_text_encoder: bool
    block_dims: tuple[tuple[str, int], ...] = ()  # (block ID, rank) where it differs from `rank`
    dora_on_output: bool = False  # DoRA magnitude per output channel instead of per input channel
    scope: dict = field(default_factory=dict, compare=False)  # the family's own settings (network_scope)

    @property
    def algo(self) -> str:
        return ALGOS[self.network_type]

    @property
    def trains_convs(self) -> bool:
        """lierla covers Linear and 1x1 conv layers only; the others add 3x3 convs."""
        return self.network_type != "lierla"

    @property
    def bypass(self) -> bool:
        # LyCORIS's bypass forward skips the DoRA rescale, so DoRA rebuilds weights.
        return not self.dora

    @property
    def with_text_encoder(self) -> bool:
        return self.train_text_encoder and self.element == "Full"

    @classmethod
    def from_config(cls, cfg, train_text_encoder: bool | None = None, family=None) -> "NetworkSpec":
        if cfg.network_type not in ALGOS:
            raise ConfigError("network_type", cfg.network_type, f"expected one of {', '.join(ALGOS)}")
        if cfg.network_dora and cfg.network_type not in ("lierla", "c3lier"):
            raise ConfigError("network_dora", True, f"DoRA works with lierla and c3lier, not {cfg.network_type}")
        from .blockctl import block_dims

        te = cfg.trains_text_encoder if train_text_encoder is None else bool(train_text_encoder)
        dims = tuple(sorted((b, d) for b, d in block_dims(cfg).items() if d != int(cfg.network_rank)))
        return cls(
            network_type=cfg.network_type, rank=int(cfg.network_rank), alpha=float(cfg.network_alpha),
            conv_rank=int(cfg.network_conv_rank or cfg.network_rank),
            conv_alpha=float(cfg.network_conv_alpha or cfg.network_alpha),
            dora=bool(cfg.network_dora), blocks=tuple(cfg.network_blocks),
            element=cfg.network_element, train_text_encoder=te, block_dims=dims,
            dora_on_output=bool(cfg.network_dora_on_output),
            scope=family.network_scope(cfg) if family is not None else {},
        )

    def rank_groups(self) -> list["NetworkSpec"]:
        """One spec per distinct rank, each covering its blocks; the first holds the rest.

        Alpha keeps the alpha/rank ratio of the base settings, so a block's
        update has the same scale whatever its rank.
        """
        by_dim: dict[int, list[str]] = {}
        for bid, dim in self.block_dims:
            if bid in self.blocks:
                by_dim.setdefault(dim, []).append(bid)
        moved = {b for group in by_dim.values() for b in group}
        base = replace(self, blocks=tuple(b for b in self.blocks if b not in moved), block_dims=(),
                       train_text_encoder=self.train_text_encoder and "BASE" not in moved)
        specs = [base]
        for dim, blocks in sorted(by_dim.items()):
            specs.append(replace(
                base, blocks=tuple(blocks), train_text_encoder=self.train_text_encoder and "BASE" in blocks,
                rank=dim, alpha=self.alpha * dim / self.rank,
                conv_rank=dim, conv_alpha=self.conv_alpha * dim / self.conv_rank))
        return specs


def text_encoder_root(te: torch.nn.Module) -> torch.nn.Module:
    """A module whose paths start with ``text_model.`` whatever the transformers version.

    transformers 5's CLIPTextModel has no ``.text_model`` level; a holder adds it
    back so the kohya names stay ``lora_te_text_model_...``. The holder only
    references `te`; nothing in `te` changes.
    """
    if isinstance(getattr(te, "text_model", None), torch.nn.Module) or not type(te).__name__.startswith("CLIP"):
        return te  # T5's paths (encoder.block...) are kohya's names as they are
    holder = torch.nn.Module()
    holder.add_module("text_model", te)
    return holder


def text_encoder_targets(text_encoders: list[torch.nn.Module]) -> list[str]:
    """Attention and MLP class names present in these encoders: CLIP's (CLIPAttention,
    CLIPSdpaAttention… depending on the installed transformers) and T5's, as sd-scripts targets them."""
    names = set()
    for te in text_encoders:
        for module in te.modules():
            cls = type(module).__name__
            if (cls in ("CLIPMLP", "T5Attention", "T5DenseGatedActDense", "T5DenseActDense")
                    or (cls.startswith("CLIP") and cls.endswith(("Attention", "Attention2")))):
                names.add(cls)
    return sorted(names)


class _FilteredKohyaNetwork(LycorisNetworkKohya):
    """LycorisNetworkKohya that asks a predicate which module paths to leave out."""

    def __init__(self, *args, skip: Callable[[str], bool], **kwargs):
        # LyCORIS walks the model inside __init__, before nn.Module state exists.
        object.__setattr__(self, "_skip", skip)
        super().__init__(*args, **kwargs)

    def is_excluded(self, name: str, *args) -> bool:
        return self._skip(name) or super().is_excluded(name, *args)


@contextmanager
def quiet_lycoris() -> Iterator[None]:
    """LyCORIS logs every build step at INFO straight to stdout; keep its warnings only."""
    level = lycoris_logger.level
    lycoris_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        lycoris_logger.setLevel(level)


@contextmanager
def _lycoris_preset(preset: dict) -> Iterator[None]:
    """Apply a preset to LycorisNetworkKohya's class state, restore it afterwards."""
    with _BUILD_LOCK, quiet_lycoris():
        saved = {a: getattr(LycorisNetworkKohya, a) for a in _PRESET_ATTRS}
        try:
            LycorisNetworkKohya.apply_preset(preset)
            yield
        finally:
            for attr, value in saved.items():
                setattr(LycorisNetworkKohya, attr, value)


def _skip_fn(bundle, spec: NetworkSpec, dims: dict[str, int], own: int | None) -> Callable[[str], bool]:
    """Which module paths a network leaves out: blocks the family's selector drops, and layers
    whose kind has a rank of its own unless this network is the one of that rank (`own`)."""
    keep_unet = bundle.family.selector(spec.blocks, spec.element, spec.scope)
    kind_of = bundle.family.layer_kind

    def skip(name: str) -> bool:
        if name == "text_model" or name.startswith("text_model."):
            return False  # text-encoder paths: whole encoders are in or out
        if not keep_unet(name):
            return True
        kind = kind_of(name) if dims else None
        if kind is None:
            return False  # a path above the layers, or a layer of no kind
        return kind in dims if own is None else dims.get(kind) != own

    return skip


def create_lycoris(bundle, spec: NetworkSpec) -> LycorisNetworkKohya:
    """Construct (not yet applied) the LyCORIS network for `bundle`.

    Blocks (or, where the family has them, layer kinds) with their own rank are built as
    separate networks of that rank whose modules then join the first one: kohya files keep
    per-module shapes, so the result saves and loads like any other network.
    """
    dims = bundle.family.layer_dims(spec.scope)
    # A layer kind's rank keeps network_alpha (sd-scripts' type_dims); block ranks keep alpha/rank.
    builds = [(s, None) for s in spec.rank_groups()] + [
        (replace(spec, rank=d, conv_rank=d, block_dims=(), train_text_encoder=False), d)
        for d in sorted({d for d in dims.values() if d > 0})]
    with _lycoris_preset(_preset_for(bundle, spec)):
        nets = [_construct(bundle, s, _skip_fn(bundle, s, dims, own)) for s, own in builds]
    main = nets[0]
    if len(nets) > 1:
        order = {"lora_unet_" + n.replace(".", "_"): i for i, (n, _) in enumerate(bundle.unet.named_modules())}
        main.text_encoder_loras = [m for net in nets for m in net.text_encoder_loras]
        main.unet_loras = sorted((m for net in nets for m in net.unet_loras), key=lambda m: order[m.lora_name])
        main.loras = main.text_encoder_loras + main.unet_loras
    share_downs(main, bundle.family.shared_down_groups(spec.scope, [m.lora_name for m in main.unet_loras]))
    return main


def share_downs(lyco: LycorisNetworkKohya, groups: list[list[str]]) -> int:
    """Give the plain LoRA modules of each group their first module's down matrix (one Parameter),
    as one LoRA on a fused layer has; returns how many modules now share. Groups with another
    algorithm, DoRA or unequal ranks are left apart."""
    by_name = {m.lora_name: m for m in lyco.loras}
    shared = 0
    for names in groups:
        mods = [by_name[n] for n in names if n in by_name]
        if len(mods) != len(names) or not all(_plain_lora(m) for m in mods):
            continue
        first = mods[0]
        if any(m.lora_down.weight.shape != first.lora_down.weight.shape for m in mods):
            continue
        for m in mods[1:]:
            m.lora_down = first.lora_down
            shared += 1
    return shared


def _plain_lora(module) -> bool:
    from lycoris.modules.locon import LoConModule

    return type(module) is LoConModule and not module.wd and not module.tucker


def _preset_for(bundle, spec: NetworkSpec) -> dict:
    return {
        "enable_conv": spec.trains_convs,
        "unet_target_module": bundle.family.network_targets(spec.trains_convs),
        "unet_target_name": [],
        "text_encoder_target_module": (text_encoder_targets(bundle.family.network_text_encoders(bundle, spec.scope))
                                       if spec.with_text_encoder else []),
        "text_encoder_target_name": [],
        "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": [],
    }


def _construct(bundle, spec: NetworkSpec, skip: Callable[[str], bool]) -> LycorisNetworkKohya:
    """One LyCORIS network at one rank."""
    tes = ([text_encoder_root(te) for te in bundle.family.network_text_encoders(bundle, spec.scope)]
           if spec.with_text_encoder else [])
    # One encoder gives lora_te_*, a list gives lora_te1_*/lora_te2_* (SDXL).
    te_arg = (tes if len(tes) > 1 else tes[0]) if tes else None
    return _FilteredKohyaNetwork(
        te_arg, bundle.unet, skip=skip,
        multiplier=1.0, lora_dim=spec.rank, alpha=spec.alpha,
        conv_lora_dim=spec.conv_rank if spec.trains_convs else 0, conv_alpha=spec.conv_alpha,
        network_module=spec.algo, weight_decompose=spec.dora,
        # Per input channel by default: the only axis A1111 1.10 applies (Forge and ComfyUI read both).
        wd_on_out=spec.dora_on_output,
        bypass_mode=spec.bypass, warn_on_unmatched=False,
    )
