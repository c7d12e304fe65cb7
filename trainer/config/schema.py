"""The one parameter schema. UI, presets, CLI, queue, API and CSV derive from it.

Field names are TrainTrain's preset keys; where a key is not a Python name
(``image_size(height, width)``, ``original prompt``) the Param carries it.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping

from .options import (OPTION_CLASSES, DataOptions, FlowOptions, FluxNetworkOptions, GridOptions, LossOptions,
                      NetworkOptions, SD3Options, StateOptions, ZImageOptions)
from .params import BLOCK_IDS, MODES, ConfigError, Param, coerce, export, param

log = logging.getLogger(__name__)

NETWORK_TYPES = ("lierla", "c3lier", "loha", "lokr")
OPTIMIZERS = (
    "AdamW", "AdamW8bit", "AdaFactor", "Lion", "Prodigy", "DAdaptAdam", "DAdaptLion",
    "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD", "Adam8bit", "SGDNesterov8bit", "Lion8bit",
    "PagedAdamW8bit", "PagedLion8bit", "RAdamScheduleFree", "AdamWScheduleFree",
    "SGDScheduleFree", "CAME", "Tiger", "Adam", "SGDNesterov",
)
SCHEDULERS = (
    "cosine", "cosine_with_restarts", "linear", "polynomial", "constant",
    "constant_with_warmup", "piecewise_constant", "step", "cosine_annealing",
    "cosine_annealing_with_restarts", "exponential", "multi_step",
)
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_ALIASES = (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"), ("float", "fp32"), ("half", "fp16"))
LOSSES = ("MSE", "L1", "Smooth-L1", "Huber")
ELEMENTS = ("Full", "CrossAttention", "SelfAttention")

_DATA = ("LoRA", "Multi-ADDifT")
_PAIR = ("Difference", "ADDifT")
_DIFF = ("Difference",)
_ADDIFT = ("ADDifT", "Multi-ADDifT")
_PROMPTED = ("iLECO", "Difference", "ADDifT")
_SIZED = ("LoRA", "iLECO", "Multi-ADDifT")
REQ = "required"

# Keys TrainTrain writes but that change nothing here; they load without a warning.
IGNORED_KEYS = frozenset({
    "logging_use_wandb", "train_repeat", "train_use_bucket", "train_optimizer_args",
    "logging_dir", "gen_noise_scheduler", "lora_train_targets", "logging_use_tensorboard",
    "image_use_transparent_background_ajust", "network_train_text_encoder", "diff_use_fixed_noise",
})
SECOND_PASS_KEY = "2nd pass"
# What Difference's second pass may set differently (the UI's 2nd-pass panel shows these).
SECOND_PASS_FIELDS = (
    "network_type", "network_rank", "network_alpha", "network_conv_rank", "network_conv_alpha", "network_element",
    "network_blocks", "train_iterations", "train_batch_size", "train_learning_rate", "train_optimizer",
    "train_optimizer_settings", "train_lr_scheduler", "train_lr_scheduler_settings", "train_lr_warmup_steps",
    "train_lr_scheduler_num_cycles", "train_lr_scheduler_power", "train_lr_step_rules", "train_snr_gamma",
    "train_loss_function", "train_min_timesteps", "train_max_timesteps", "train_seed", "use_gradient_checkpointing",
    "train_model_precision", "train_lora_precision", "save_precision", "save_per_steps",
)
# What identifies the job stays from pass 1 even when "2nd pass" lists it.
_PASS1_ONLY = frozenset({
    "mode", "model", "vae", "save_lora_name", "original prompt", "target prompt", "negative prompt",
    "diff_original_image", "diff_target_image", "lora_data_directory", "use_2nd_pass_settings",
    "diff_load_1st_pass", "diff_save_1st_pass", "diff_1st_pass_only", "save_overwrite", "save_as_json",
    "logging_save_csv", "model_v_pred",
})


@dataclass
class TrainConfig(NetworkOptions, LossOptions, DataOptions, StateOptions, GridOptions, FlowOptions,
                  FluxNetworkOptions, SD3Options, ZImageOptions):
    """Every setting of one training job, with its TrainTrain default (options/ adds the rest)."""

    mode: str = param("choice", "LoRA", "Mode", "What to train: LoRA from images, iLECO from prompts, Difference/ADDifT from image pairs.", choices=MODES, section=REQ)
    model: str = param("path", "", "Model", "Checkpoint file or diffusers folder; empty uses the loaded/default model.", section=REQ)
    vae: str = param("path", "", "VAE", "Optional separate VAE file; empty or None uses the model's own.", section=REQ)
    network_type: str = param("choice", "lierla", "Network type", "lierla = LoRA, c3lier = LoCon (adds 3x3 convs), loha = LoHa, lokr = LoKr.", choices=NETWORK_TYPES, aliases=(("lora", "lierla"), ("locon", "c3lier")), section=REQ)
    network_rank: int = param("int", 16, "Rank (dim)", "Rank of the low-rank update.", minimum=1, maximum=1024, section=REQ)
    network_alpha: float = param("float", 8.0, "Alpha", "Scale is alpha / rank.", minimum=1e-6, maximum=4096, section=REQ)
    lora_data_directory: str = param("path", "", "Image folder", "Folder of training images (searched recursively) with .txt or .caption files.", modes=_DATA, section=REQ)
    diff_target_name: str = param("str", "", "Target suffix", "Multi-ADDifT pairs x.png with x<suffix>.png.", modes=("Multi-ADDifT",), section=REQ)
    lora_trigger_word: str = param("str", "", "Trigger word", "Put first in every caption.", modes=_DATA, section=REQ)
    image_size: list = param("size", [512, 512], "Image size (height, width)", "Training size: 512 or height,width.", key="image_size(height, width)", minimum=16, maximum=8192, modes=_SIZED, section=REQ)
    train_iterations: int = param("int", 1000, "Iterations", "Number of optimizer steps.", minimum=1, maximum=10_000_000, section=REQ)
    train_batch_size: int = param("int", 2, "Batch size", "Images per step.", minimum=1, maximum=1024, section=REQ)
    train_learning_rate: float = param("float", 1e-4, "Learning rate", "Learning rate of the network (U-Net part).", minimum=0, maximum=100, section=REQ)
    train_optimizer: str = param("choice", "AdamW", "Optimizer", "Optimizer; extra arguments go in the optimizer settings.", choices=OPTIMIZERS, section=REQ)
    train_optimizer_settings: str = param("text", "", "Optimizer settings", "k=v pairs, one per line or separated by ';', e.g. weight_decay=0.01; betas=(0.9,0.99).", section=REQ)
    train_lr_scheduler: str = param("choice", "cosine", "LR scheduler", "How the learning rate changes over the run.", choices=SCHEDULERS, section=REQ)
    train_lr_scheduler_settings: str = param("text", "", "LR scheduler settings", "k=v pairs for the scheduler, e.g. eta_min=1e-5.", section=REQ)
    save_lora_name: str = param("str", "", "Output name", "File name of the LoRA, without extension.", maximum=200, section=REQ)
    use_gradient_checkpointing: bool = param("bool", False, "Gradient checkpointing", "Saves memory at about 30% more time per step.", section=REQ)
    network_blocks: list = param("blocks", list(BLOCK_IDS), "Blocks (BASE = text encoder)", "Which U-Net blocks (and the text encoder) the network covers.", key="network_blocks(BASE = TextEncoder)", section=REQ)

    network_resume: str = param("path", "", "Resume from", "Existing network file to continue training; with its <name>-state/ folder it continues exactly.", modes=("LoRA", "iLECO", "Difference", "Multi-ADDifT", "ADDifT"), group="network")
    network_strength: float = param("float", 1.0, "Strength baked into file", "The saved file's effect is multiplied by this.", minimum=-100, maximum=100, group="network")
    network_conv_rank: int = param("int", 0, "Conv rank", "Rank for 3x3 convs (c3lier and LyCORIS); 0 uses the rank.", minimum=0, maximum=1024, group="network")
    network_conv_alpha: float = param("float", 0.0, "Conv alpha", "Alpha for 3x3 convs; 0 uses the alpha.", minimum=0, maximum=4096, group="network")
    network_element: str = param("choice", "Full", "Elements", "Full, or only cross-attention or self-attention layers.", choices=ELEMENTS, group="network")
    network_dora: bool = param("bool", False, "DoRA", "Weight-decomposed low-rank adaptation (lierla/c3lier).", group="network")
    image_buckets_step: int = param("int", 256, "Bucket step", "Side lengths of aspect-ratio buckets step by this many pixels.", minimum=8, maximum=4096, modes=_DATA, group="data")
    image_num_multiply: int = param("int", 1, "Repeat images", "Each image counts this many times per epoch.", minimum=1, maximum=10_000, modes=_DATA, group="data")
    image_min_length: int = param("int", 512, "Minimum side", "Shortest bucket side.", minimum=8, maximum=8192, modes=_DATA, group="data")
    image_max_ratio: float = param("float", 2.0, "Max aspect ratio", "Longest/shortest side limit for buckets.", minimum=1, maximum=16, modes=_DATA, group="data")
    sub_image_num: int = param("int", 0, "Sub images", "Extra downscaled copies of each image in smaller buckets.", minimum=0, maximum=64, modes=_DATA, group="data")
    image_mirroring: bool = param("bool", False, "Mirror images", "Add a horizontally flipped copy of every image.", modes=_DATA, group="data")
    image_use_filename_as_tag: bool = param("bool", False, "File name as caption", "Use the file name (underscores become commas) when there is no caption file.", modes=_DATA, group="captions")
    image_disable_upscale: bool = param("bool", False, "No upscaling", "Skip an image rather than enlarge it to its bucket.", modes=_DATA, group="data")
    train_fixed_timsteps_in_batch: bool = param("bool", False, "Same timestep in batch", "Draw one timestep per batch instead of one per image.", group="noise")
    train_textencoder_learning_rate: float | None = param("optfloat", None, "Text encoder LR", "Learning rate of the text encoder; empty uses the learning rate, 0 freezes it.", minimum=0, maximum=100, modes=("LoRA",), group="lr")
    train_seed: int = param("int", -1, "Seed", "-1 draws a seed and records it.", minimum=-1, maximum=2**63 - 1, group="precision")
    train_min_timesteps: int = param("int", 0, "Min timestep", "Lowest timestep sampled.", minimum=0, maximum=999, group="noise")
    train_max_timesteps: int = param("int", 1000, "Max timestep", "Timesteps are sampled below this.", minimum=1, maximum=1000, group="noise")
    train_loss_function: str = param("choice", "MSE", "Loss", "MSE, L1, or Huber / Smooth-L1 (see huber_c and huber_schedule).", choices=LOSSES, aliases=(("huber", "Huber"), ("smooth_l1", "Smooth-L1"), ("l2", "MSE")), group="loss")
    train_lr_step_rules: str = param("str", "", "Step rules", "For piecewise_constant/step: 'mult:steps,...,mult', e.g. 1:100,0.5:200,0.1.", group="lr")
    train_lr_warmup_steps: int = param("int", 0, "Warmup steps", "Linear warmup at the start.", minimum=0, maximum=10_000_000, group="lr")
    train_lr_scheduler_num_cycles: int = param("int", 1, "Cycles", "Restarts for cosine_with_restarts.", minimum=1, maximum=10_000, group="lr")
    train_lr_scheduler_power: float = param("float", 1.0, "Power", "Power of the polynomial scheduler.", minimum=0, maximum=100, group="lr")
    train_snr_gamma: float = param("float", 5.0, "Min-SNR gamma", "Min-SNR-γ loss weighting; 0 turns it off.", minimum=0, maximum=1000, group="loss")
    noise_offset: float = param("float", 0.0, "Noise offset", "Adds per-channel offset noise so the model learns very dark/bright images.", minimum=0, maximum=1, group="noise")
    save_per_steps: int = param("int", 0, "Save every N steps", "Also save <name>_<N>steps every N steps; 0 saves only at the end.", minimum=0, maximum=10_000_000, group="saving")
    train_model_precision: str = param("choice", "fp16", "Model precision", "dtype of the frozen model weights.", choices=PRECISIONS, aliases=PRECISION_ALIASES, group="precision")
    train_lora_precision: str = param("choice", "fp32", "Network precision", "dtype of the trained network weights.", choices=PRECISIONS, aliases=PRECISION_ALIASES, group="precision")
    train_VAE_precision: str = param("choice", "fp32", "VAE precision", "dtype of the VAE while caching latents.", choices=PRECISIONS, aliases=PRECISION_ALIASES, group="precision")
    save_precision: str = param("choice", "fp16", "Save precision", "dtype of the saved file.", choices=PRECISIONS, aliases=PRECISION_ALIASES, group="saving")
    diff_load_1st_pass: str = param("path", "", "Load 1st pass", "Use this copier network and skip pass 1.", modes=_DIFF, group="pairs")
    diff_save_1st_pass: bool = param("bool", False, "Save 1st pass", "Also save the copier network as <name>_copy.", modes=_DIFF, group="pairs")
    diff_1st_pass_only: bool = param("bool", False, "1st pass only", "Stop after the copier network.", modes=_DIFF, group="pairs")
    diff_revert_original_target: bool = param("bool", False, "Swap original/target", "Train the opposite direction.", modes=_ADDIFT, group="pairs")
    diff_use_diff_mask: bool = param("bool", False, "Difference mask", "Weight the loss by where the pair differs.", modes=_ADDIFT, group="pairs")
    diff_alt_ratio: float = param("float", 1.0, "Alternate ratio", "Strength of the swapped (odd) steps.", minimum=-100, maximum=100, modes=_ADDIFT, group="pairs")
    diff_original_image: str = param("path", "", "Original image", "Image file of the original (before) state.", modes=_PAIR)
    diff_target_image: str = param("path", "", "Target image", "Image file of the target (after) state.", modes=_PAIR)
    logging_save_csv: bool = param("bool", True, "Write CSV log", "Log step, loss and learning rate to logs/.", group="saving")
    logging_verbose: bool = param("bool", False, "Verbose", "Print more while preparing.", group="saving")
    save_overwrite: bool = param("bool", False, "Overwrite", "Replace an existing file of the same name.", group="saving")
    save_as_json: bool = param("bool", False, "Save settings JSON", "Write the settings next to the logs.", group="saving")
    model_v_pred: bool = param("bool", False, "v-prediction", "The model predicts v (SD2 768-v); detected when possible.", group="precision")
    use_2nd_pass_settings: bool = param("bool", False, "Use 2nd pass settings", "Difference pass 2 uses the '2nd pass' settings.", modes=_DIFF, group="pairs")
    original_prompt: str = param("text", "", "Original prompt", "iLECO: the concept to change. Difference: the caption of both images. ADDifT: the caption of the original.", key="original prompt", modes=_PROMPTED)
    target_prompt: str = param("text", "", "Target prompt", "iLECO: what it becomes (empty erases). ADDifT: the caption of the target.", key="target prompt", modes=("iLECO", "ADDifT"))
    negative_prompt: str = param("text", "", "Negative prompt", "Only used for previews and samples.", key="negative prompt", modes=("iLECO",))
    sample_every_n_steps: int = param("int", 0, "Sample every N steps", "Render the sample prompts with the network applied every N steps (and at the end); 0 turns samples off.", minimum=0, maximum=10_000_000, group="samples")
    sample_prompts: str = param("text", "", "Sample prompts", "One prompt per line, rendered at the training size.", group="samples")
    sample_steps: int = param("int", 20, "Sample steps", "Denoising steps per sample image.", minimum=1, maximum=150, group="samples")
    second_pass: dict = dataclasses.field(default_factory=dict, metadata={"second_pass": True})

    # ---- schema access -------------------------------------------------
    @classmethod
    def params(cls) -> Iterator[tuple[str, Param]]:
        """(attribute name, Param) for every setting, in UI order: TrainTrain's own, then options/."""
        own = cls.__dict__.get("__annotations__", {})
        rank = {name: i for i, c in enumerate(OPTION_CLASSES, start=1) for name in c.__dict__.get("__annotations__", {})}
        for f in sorted(fields(cls), key=lambda f: 0 if f.name in own else rank.get(f.name, len(rank) + 1)):
            kw = f.metadata.get("param_kw")
            if kw is not None:
                kw = dict(kw)
                key = kw.pop("key") or f.name
                yield f.name, Param(key=key, **kw)

    @classmethod
    def param_for(cls, key: str) -> tuple[str, Param]:
        """Look a setting up by preset key, attribute name or legacy key."""
        for name, p in cls.params():
            if key in (p.key, name) or key in p.legacy:
                return name, p
        raise KeyError(key)

    @classmethod
    def defaults(cls) -> "TrainConfig":
        return cls()

    # ---- conversion ----------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: "TrainConfig | None" = None,
                  warnings: list[str] | None = None) -> "TrainConfig":
        """Build from a preset-shaped mapping; missing keys keep `base`/defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError("preset", type(data).__name__, "expected a JSON object of settings")
        cfg = dataclasses.replace(base) if base is not None else cls()
        cfg.second_pass = dict(cfg.second_pass)
        notes = warnings if warnings is not None else []
        for key, value in data.items():
            if key == SECOND_PASS_KEY:
                cfg.second_pass = cls._second_pass(value)
                continue
            try:
                name, p = cls.param_for(key)
            except KeyError:
                if key not in IGNORED_KEYS:
                    notes.append(f"unknown setting {key!r} ignored")
                    log.warning("unknown setting %r ignored", key)
                continue
            setattr(cfg, name, coerce(p, value, copy.deepcopy(_DEFAULTS[name])))
        if cfg.vae.lower() == "none":
            cfg.vae = ""
        return cfg

    @classmethod
    def _second_pass(cls, value: Any) -> dict:
        if value in (None, "", {}):
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(SECOND_PASS_KEY, value, "expected an object of settings")
        cls.from_dict({k: v for k, v in value.items() if k != SECOND_PASS_KEY})  # validates
        return {k: v for k, v in value.items() if k != SECOND_PASS_KEY}

    def to_dict(self) -> dict[str, Any]:
        """Preset-shaped dict (TrainTrain keys) that from_dict reads back."""
        out: dict[str, Any] = {}
        for name, p in self.params():
            out[p.key] = export(p, getattr(self, name))
        if self.second_pass:
            out[SECOND_PASS_KEY] = dict(self.second_pass)
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TrainConfig":
        """A copy with some settings changed (CLI --set, API overrides)."""
        return type(self).from_dict(overrides, base=self)

    def for_pass(self, n: int) -> "TrainConfig":
        """Settings for Difference pass n (1 or 2); pass 2 may use '2nd pass'."""
        if n == 1 or not (self.use_2nd_pass_settings and self.second_pass):
            return dataclasses.replace(self)
        overrides = {k: v for k, v in self.second_pass.items() if k not in _PASS1_ONLY}
        return self.with_overrides(overrides)

    # ---- checks --------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Cross-field checks that a single value cannot make. Returns self."""
        from ..fsutil import check_name  # local: fsutil imports nothing from here

        if not self.save_lora_name:
            raise ConfigError("save_lora_name", self.save_lora_name, "is empty; give the output a name")
        check_name("save_lora_name", self.save_lora_name)
        if self.train_min_timesteps >= self.train_max_timesteps:
            raise ConfigError("train_min_timesteps", self.train_min_timesteps,
                              f"must be below train_max_timesteps ({self.train_max_timesteps})")
        if self.network_dora and self.network_type not in ("lierla", "c3lier"):
            raise ConfigError("network_dora", True, f"DoRA works with lierla and c3lier, not {self.network_type}")
        from .kvparse import parse_settings, parse_step_rules

        if self.sample_every_n_steps and not self.sample_prompts.strip():
            raise ConfigError("sample_prompts", self.sample_prompts,
                              "is empty; give at least one prompt per line, or set sample_every_n_steps to 0")
        parse_settings(self.train_optimizer_settings, "train_optimizer_settings")
        parse_settings(self.train_lr_scheduler_settings, "train_lr_scheduler_settings")
        if self.train_lr_step_rules:
            parse_step_rules(self.train_lr_step_rules)
        for options in OPTION_CLASSES:
            options.check(self)
        return self

    @property
    def trains_text_encoder(self) -> bool:
        """LoRA mode with BASE selected and a non-zero text-encoder rate."""
        te_lr = self.train_learning_rate if self.train_textencoder_learning_rate is None else self.train_textencoder_learning_rate
        return self.mode == "LoRA" and "BASE" in self.network_blocks and te_lr > 0

    @property
    def text_encoder_lr(self) -> float:
        if self.train_textencoder_learning_rate is None:
            return self.train_learning_rate
        return self.train_textencoder_learning_rate


_DEFAULTS: dict[str, Any] = {name: getattr(TrainConfig(), name) for name, _ in TrainConfig.params()}

__all__ = ["TrainConfig", "ConfigError", "MODES", "BLOCK_IDS", "NETWORK_TYPES", "OPTIMIZERS",
           "SCHEDULERS", "PRECISIONS", "LOSSES", "ELEMENTS", "IGNORED_KEYS", "SECOND_PASS_KEY", "SECOND_PASS_FIELDS"]
