"""The model-family protocol: everything the trainer asks a family instead of testing its name.

Modes, the loop, the networks, the UI, the API and the CLI hold a `Family` (``bundle.family``)
and call it; only the files in this package know what SD1, SD2 or SDXL is. Adding a family is
one new file with a subclass plus its tests, registered in ``families/__init__.py``.

What a family answers, grouped as the issue of a training job meets them:
- identity and files: ``name``, ``label``, the text encoders it has, the kohya / modelspec
  metadata values, whether LoRA files name its denoiser in the original-model layout;
- loading: claims a state dict's keys (``claims``), builds a bundle from a state dict, a
  diffusers folder, or a host's weights (``families.loading`` holds the shared U-Net loaders);
- conditioning: prompt encoding (``encode_prompts``), size conditioning (``time_ids``);
- the objective: timestep sampling, noisy model input, the denoiser forward, the training
  target (epsilon, v, flow) and the loss; ``check`` refuses settings the family cannot use;
- block IDs for block selection, per-block rates and ranks (``block_ids``, ``block_id``,
  ``selector``); per-layer ranks (``layer_dims``, ``layer_kind``), layers that share one down
  matrix (``shared_down_groups``) and text-encoder rates of their own (``text_encoder_lrs``);
- sampling: the diffusers pipeline for samples, previews and the evaluation grid.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import torch

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .textenc import Cond


class Family:
    """Base class of the model families. Subclasses set the class attributes and override methods."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    text_encoder_count: ClassVar[int] = 1
    pad_tokens: ClassVar[tuple[str, ...]] = ("<|endoftext|>",)
    vae_scale: ClassVar[float] = 0.18215
    model_version: ClassVar[str] = ""          # kohya's ss_base_model_version
    modelspec_arch: ClassVar[str] = ""         # modelspec.architecture, before "/lora"
    implementation: ClassVar[str] = "diffusers"  # modelspec.implementation
    ldm_unet_keys: ClassVar[bool] = False      # LoRA files name denoiser modules in the original layout
    v_pred_detectable: ClassVar[bool] = False  # A1111's output test tells v-prediction apart
    host_clip_skip_limit: ClassVar[int] = 99   # the highest clip skip a WebUI applies to this family
    applies_clip_skip: ClassVar[bool] = False  # A1111's CLIP skip applies (SD1 only)
    host_weights: ClassVar[bool] = True  # a WebUI's loaded weights can be trained (not FLUX's inference storage)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # identity and metadata ------------------------------------------------------------
    def architecture(self, v_pred: bool) -> str:
        """modelspec.architecture without the network suffix."""
        return self.modelspec_arch

    def metadata(self, bundle: ModelBundle) -> dict[str, str]:
        """The base-model values of kohya's and modelspec's metadata for a file trained on `bundle`."""
        return {"ss_base_model_version": self.model_version, "ss_v2": "False",
                "ss_v_parameterization": str(bool(bundle.v_pred)),
                "modelspec.implementation": self.implementation}

    # loading -----------------------------------------------------------------------------
    @classmethod
    def claims(cls, keys: Iterable[str], state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Whether a checkpoint's keys belong to this family (only families that are not SD U-Nets)."""
        return False

    # conditioning ---------------------------------------------------------------------------
    def encode_prompts(self, bundle: ModelBundle, prompts: list[str], *, clip_skip: int,
                       grad: bool) -> Cond:
        raise NotImplementedError(f"{self.name}: prompt encoding")

    def time_ids(self, original_hw: Any, crop_top_left: Any, target_hw: Any, *,
                 device: torch.device | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Size conditioning the denoiser takes besides the prompt; None when it takes none."""
        return None

    def denoise(self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond,
                time_ids: torch.Tensor | None, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One denoiser forward on latents shaped as the VAE makes them; returns the prediction the
        training target is compared with (same shape as `noisy`)."""
        raise NotImplementedError(f"{self.name}: denoiser forward")

    def latent_channels(self, bundle: ModelBundle) -> int:
        """Channels of the VAE latents the denoiser takes (before any patching)."""
        return int(bundle.vae.config.latent_channels)

    def check(self, cfg: Any) -> list[str]:
        """Refuse, with a ConfigError naming the key, settings this family cannot train with; returns
        messages about settings it trains without (the job shows them)."""
        return []

    def prepare(self, bundle: ModelBundle, cfg: Any, device: torch.device) -> None:
        """Take a pass's settings that prompt encoding, the forward and sampling need
        (kept in ``bundle.extra``, so each job sets its own), before its network is built."""

    def place(self, bundle: ModelBundle, cfg: Any, device: torch.device) -> Callable[[], None] | None:
        """Put the frozen denoiser on the training device; returns what undoes any special placement."""
        bundle.unet.to(device)
        return None

    def latent_multiple(self, bundle: ModelBundle) -> int:
        """Pixel sizes must be multiples of this for the denoiser to accept them."""
        return bundle.vae_factor

    def native_size(self, bundle: ModelBundle) -> int:
        """The side in pixels the model was trained at."""
        raise NotImplementedError(f"{self.name}: native size")

    # networks and files --------------------------------------------------------------------------
    def network_targets(self, trains_convs: bool) -> list[str]:
        """Class names of the denoiser modules LyCORIS wraps."""
        raise NotImplementedError(f"{self.name}: network targets")

    def network_text_encoders(self, bundle: ModelBundle, scope: Mapping[str, Any] | None = None) -> list[torch.nn.Module]:
        """The text encoders a network may train (all of them unless the family says otherwise)."""
        return list(bundle.text_encoders)

    def network_scope(self, cfg: Any) -> dict[str, Any]:
        """The family's own network settings, read once from a job's settings (NetworkSpec.scope)."""
        return {}

    def network_args(self, cfg: Any) -> dict[str, str]:
        """The family's own entries of ss_network_args (values as strings, as sd-scripts stores them)."""
        return {}

    def layer_dims(self, scope: Mapping[str, Any]) -> dict[str, int]:
        """{layer kind: rank} for denoiser layers given a rank of their own (0: left out)."""
        return {}

    def layer_kind(self, module_path: str) -> str | None:
        """The kind `layer_dims` names for a denoiser module path, or None."""
        return None

    def shared_down_groups(self, scope: Mapping[str, Any], lora_names: list[str]) -> list[list[str]]:
        """Network modules (in-memory names) that share one down matrix, as one fused layer."""
        return []

    def text_encoder_lrs(self, cfg: Any) -> dict[str, float]:
        """{in-memory name prefix: rate} for text-encoder modules at a rate of their own."""
        return {}

    def file_names(self, bundle: ModelBundle, lora_names: list[str]) -> dict[str, str]:
        """In-memory module name -> the name files use, where they differ."""
        return {}

    def to_file(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A network state dict (after `file_names`) in the layout files hold."""
        return state_dict

    def from_file(self, state_dict: dict[str, torch.Tensor],
                  target: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
        """The inverse of `to_file`; `target` (the network's own names and shapes) settles what the
        file layout leaves open."""
        return state_dict

    # the objective -----------------------------------------------------------------------------
    def sample_timesteps(self, cfg: Any, batch: int, latent_shape: tuple[int, ...], *,
                         generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """The timesteps of one step's batch, in the convention `noisy_input`, `denoise` and the
        loss of this family share."""
        raise NotImplementedError(f"{self.name}: timestep sampling")

    def make_loss(self, cfg: Any, scheduler: Any, *, v_pred: bool, device: torch.device) -> Any:
        """The loss: called as loss(pred, target, timesteps, mask) -> (scalar, per-sample [B])."""
        raise NotImplementedError(f"{self.name}: loss")

    def noisy_input(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's input at `timesteps` for clean `latents` and `noise`."""
        raise NotImplementedError(f"{self.name}: noising")

    def target(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               v_pred: bool) -> torch.Tensor:
        """What the denoiser is trained to predict (epsilon, v or the flow)."""
        raise NotImplementedError(f"{self.name}: training target")

    # blocks ------------------------------------------------------------------------------------
    def block_ids(self) -> tuple[str, ...]:
        """The block IDs this family's denoiser has, in order (BASE not included)."""
        raise NotImplementedError(f"{self.name}: block IDs")

    def block_id(self, module_name: str) -> str | None:
        """The block ID of a denoiser module path, or None when it lies in no single block."""
        raise NotImplementedError(f"{self.name}: block IDs")

    def selector(self, blocks: Iterable[str], element: str, scope: Mapping[str, Any] | None = None) -> Callable[[str], bool]:
        """A predicate over denoiser module paths: does a network with these settings cover it?
        (`scope`: what `network_scope` took from the job's settings.)"""
        raise NotImplementedError(f"{self.name}: block selection")

    # sampling ------------------------------------------------------------------------------------
    def sampling_scheduler(self, noise_scheduler: Any, sampler: str) -> Any:
        """The scheduler samples are drawn with, made from the training schedule; `sampler` is one of
        samples.SAMPLERS."""
        raise NotImplementedError(f"{self.name}: sampling scheduler")

    def pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        """A diffusers pipeline over the bundle's own modules (no copies)."""
        raise NotImplementedError(f"{self.name}: sampling pipeline")

    def pipeline_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's output_type="latent" result as [B, C, H/8, W/8] latents."""
        return latents

    def pipeline_embeds(self, cond: Cond) -> dict[str, Any]:
        """Pipeline keyword arguments for a [prompt, negative] conditioning pair."""
        return {"prompt_embeds": cond.hidden[:1], "negative_prompt_embeds": cond.hidden[1:]}
