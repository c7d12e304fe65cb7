"""The WebUI host (AUTOMATIC1111 1.10, Forge): the only code that imports the WebUI's `modules`.

It trains on the model the WebUI already has loaded: the bundle is built from the
host's tensors in memory (shared on A1111, cloned on Forge, whose tensors are
inference-mode), after taking any merged LoRA out. Another checkpoint is loaded from
its file through the core loader, and the host's model stays as it was. While a job
runs it holds the host's generation lock and shows the job in the host's progress.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..families.bundle import ModelBundle
from ..config.schema import TrainConfig
from ..training.events import Progress
from ..config.params import ConfigError
from . import weights

log = logging.getLogger(__name__)


def console(message: str) -> None:
    """One line in the WebUI's console. Both hosts show extension loggers' INFO lines only
    under --loglevel INFO, and which model a job trains on must show by default."""
    if log.isEnabledFor(logging.INFO):
        log.info(message)
    else:
        print(f"Traindeck: {message}", flush=True)


def release_memory(devices: Any) -> None:
    """Give a job's copies back: collect cycles, the host's cache cleanup, and glibc's free heap.

    glibc serves the many mid-sized tensors of a model copy from its heap, not from mmap,
    and keeps freed heap pages in the process unless asked to return them (malloc_trim);
    without it the WebUI's resident size grows by a model copy per job.
    """
    gc.collect()
    getattr(devices, "torch_gc", lambda: None)()
    libc_name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
    if trim is not None:  # glibc only; other C libraries return freed memory by themselves
        trim(0)


def _module(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def host_kind() -> tuple[str, str]:
    """('a1111' | 'forge' | 'unsupported', a sentence for the console and the tab)."""
    if _module("modules_forge") is not None:
        return "forge", "Forge"
    launch = _module("modules.launch_utils")
    tag = str(getattr(launch, "git_tag", lambda: "")() or "") if launch is not None else ""
    if tag.lstrip("v").startswith("1.10"):
        return "a1111", f"AUTOMATIC1111 {tag}"
    return "unsupported", (f"this WebUI ({tag or 'unknown version'}) is not one Traindeck was tested on "
                           "(AUTOMATIC1111 1.10.x, Forge); training may fail")


class WebUIHost:
    """Host protocol over the running WebUI."""

    name = "webui"

    def __init__(self) -> None:
        from modules import call_queue, sd_models, shared  # noqa: F401 (fail early outside a WebUI)

        self.kind, self.description = host_kind()
        self.on_interrupt: Callable[[], None] | None = None

    # ---- folders and model lists --------------------------------------------------
    def lora_dir(self) -> Path:
        from modules import paths, shared

        configured = getattr(shared.cmd_opts, "lora_dir", None)
        return Path(configured) if configured else Path(paths.models_path) / "Lora"

    def list_models(self) -> list[str]:
        from modules import sd_models

        return [info.title for info in sd_models.checkpoints_list.values()]

    def list_vaes(self) -> list[str]:
        from modules import sd_vae

        return sorted(getattr(sd_vae, "vae_dict", {}))

    def _loaded_info(self) -> Any | None:
        from modules import shared

        model = getattr(shared, "sd_model", None)
        if model is None or (self.kind == "forge" and not hasattr(model, "forge_objects")):
            return None  # Forge's FakeInitialModel holds no weights yet
        return getattr(model, "sd_checkpoint_info", None)

    def is_loaded(self, name: str) -> bool:
        """Whether `name` (empty: "whatever is loaded") is the model the WebUI holds now."""
        info = self._loaded_info()
        if info is None:
            return False
        if not name:
            return True
        names = {getattr(info, a, None) for a in ("title", "name", "name_for_extra", "model_name", "short_title")}
        filename = getattr(info, "filename", "")
        return name in names or (bool(filename) and Path(name).expanduser() == Path(filename))

    def checkpoint_path(self, name: str) -> Path:
        """The file of a checkpoint title, name or path."""
        from modules import sd_models, shared

        if not name:
            name = getattr(shared.opts, "sd_model_checkpoint", "") or ""
        info = sd_models.get_closet_checkpoint_match(name) if name else None
        if info is not None:
            return Path(info.filename)
        # Only the WebUI's own checkpoints: a job (perhaps from the API) never names any other file.
        raise ConfigError("model", name, "is not a checkpoint the WebUI knows; pick one from the list")

    def _vae_path(self, name: str) -> Path:
        from modules import sd_vae

        path = getattr(sd_vae, "vae_dict", {}).get(name)
        if not path or not Path(path).is_file():
            raise ConfigError("vae", name, "is not a VAE the WebUI knows")
        return Path(path)

    # ---- the model ---------------------------------------------------------------------
    def load_bundle(self, cfg: TrainConfig, *, dtype: torch.dtype, device: torch.device) -> ModelBundle:
        from ..families.loading import load_model, load_vae_file

        flux = self._from_files(cfg, dtype)
        if flux is not None:
            return flux
        lossy = self._forge_lossy_storage() if self.is_loaded(cfg.model) else None
        if lossy or not self.is_loaded(cfg.model):
            path = self.checkpoint_path(cfg.model)
            vae = self._vae_path(cfg.vae) if cfg.vae else None
            bundle = load_model(path, vae=vae, v_pred=True if cfg.model_v_pred else None, dtype=dtype,
                                device=torch.device("cpu"))
            why = f"Forge holds its U-Net as {lossy}, not the checkpoint's weights" if lossy else "the WebUI keeps its own model"
            bundle.extra["trains_on"] = f"training on {path.name}, read from its file ({why})"
            console(bundle.extra["trains_on"])
            return bundle
        bundle = self._from_memory(cfg, dtype)
        if cfg.vae:
            bundle.vae = load_vae_file(self._vae_path(cfg.vae), scaling_factor=bundle.vae_scale,
                                       dtype=next(bundle.vae.parameters()).dtype)
        return bundle

    # ---- FLUX and SD3: always from their files -------------------------------------------------------
    COMPONENT_DIRS = ("text_encoder", "clip", "VAE", "vae", "Stable-diffusion")

    def _from_files(self, cfg: TrainConfig, dtype: torch.dtype) -> ModelBundle | None:
        """A checkpoint of a family the host cannot hand over (FLUX, SD3, Z-Image) is read from its files:
        A1111 cannot hold FLUX and keeps SD3 in its own modules; Forge holds both for inference
        (fp8/nf4/gguf storage under inference mode), which cannot be trained in place."""
        from ..families import file_family, get_family
        from ..families.loading import load_model

        info = self._loaded_info() if self.is_loaded(cfg.model) else None
        filename = getattr(info, "filename", "") if info is not None else ""
        path = Path(filename) if filename else self.checkpoint_path(cfg.model)
        family = file_family(path)
        if family is None:
            from ..families.zimage_load import is_zimage_model, require_zimage

            if is_zimage_model(path):
                require_zimage(path)  # a Z-Image file where diffusers cannot build one: say which version
            return None
        if get_family(family).host_weights:
            return None
        parts = {role: str(self._component(role, getattr(cfg, role)))
                 for role in ("clip_l", "clip_g", "t5xxl", "ae", "qwen3") if getattr(cfg, role)}
        bundle = load_model(path, dtype=dtype, device=torch.device("cpu"), components=parts,
                            tokenizer_extra=tuple(self._t5_tokenizer_places()))
        label = get_family(family).label
        why = (f"AUTOMATIC1111 cannot hand {label} weights to the trainer" if self.kind == "a1111" else
               f"Forge holds {label} for inference only, in storage that cannot be trained in place")
        bundle.extra["trains_on"] = f"training on {path.name} and its text encoder and autoencoder files ({why})"
        console(bundle.extra["trains_on"])
        return bundle

    def _component(self, role: str, name: str) -> Path:
        """A model part the user picked (FLUX, SD3): a file in the WebUI's text encoder, CLIP, VAE or checkpoint folders."""
        from modules import paths

        from ..fsutil import inside

        roots = [Path(paths.models_path) / d for d in self.COMPONENT_DIRS]
        for root in roots:
            for candidate in (root / name, root / f"{name}.safetensors", root / f"{name}.sft"):
                # only the WebUI's own files: a job (perhaps from the API) never names any other
                if candidate.is_file() and inside(root, candidate):
                    return candidate
        listing = ", ".join(str(r) for r in roots)
        raise ConfigError(role, name, f"is not a file in the WebUI's model folders ({listing})")

    def _t5_tokenizer_places(self) -> list[Path]:
        """Forge ships T5's tokenizer with its FLUX configs."""
        if self.kind != "forge":
            return []
        from modules import paths

        from ..families.flux_parts import forge_t5_tokenizers

        return forge_t5_tokenizers(getattr(paths, "script_path", Path(paths.models_path).parent))

    def list_components(self) -> list[str]:
        """Files the part pickers (FLUX, SD3) offer: the WebUI's text encoders and VAEs."""
        from modules import paths

        found = set()
        for d in self.COMPONENT_DIRS[:4]:
            root = Path(paths.models_path) / d
            if root.is_dir():
                found.update(p.name for p in root.iterdir() if p.suffix.lower() in (".safetensors", ".sft"))
        return sorted(found)

    def _forge_lossy_storage(self) -> str | None:
        from modules import shared

        return weights.forge_lossy_storage(shared.sd_model) if self.kind == "forge" else None

    def _from_memory(self, cfg: TrainConfig, dtype: torch.dtype) -> ModelBundle:
        from modules import shared

        from ..families.checkpoint import sibling_yaml

        model = shared.sd_model
        info = model.sd_checkpoint_info
        forced = True if cfg.model_v_pred else None
        # The ldm config the host used (A1111 records it), else the A1111 convention of a .yaml beside the file.
        used = getattr(model, "used_config", None)
        config = used if used and Path(used).is_file() else sibling_yaml(info.filename)
        if self.kind == "forge":
            predictor = model.forge_objects.unet.model.predictor
            v_pred = forced or getattr(predictor, "prediction_type", "") == "v_prediction" or None
            bundle = weights.forge_bundle(model, name=info.name, v_pred=v_pred, original_config=config, dtype=dtype)
        else:
            bundle_loras = weights.unmerge_loras(model, _module("networks"))
            v_pred = forced or getattr(model, "parameterization", "eps") == "v" or None
            bundle = weights.load_from_state_dict(weights.a1111_state_dict(model), name=info.name, v_pred=v_pred,
                                                  original_config=config)
            bundle.extra["loras_taken_out"] = bundle_loras
        bundle.extra["reused_from_host"] = True
        taken = bundle.extra["loras_taken_out"]
        note = f"; {taken} weights of a merged LoRA left out" if taken else ""
        bundle.extra["trains_on"] = f"training on the WebUI's loaded model {info.title} (reused from memory, no file read{note})"
        console(bundle.extra["trains_on"])
        return bundle

    def encode_fn(self, bundle: ModelBundle) -> Callable[[list[str]], object]:
        """Prompts through the same text encoder weights, with the host's clip skip."""
        from modules import shared

        from ..families.textenc import encode_prompts

        skip = int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
        family = bundle.family
        if self.kind == "a1111" and not family.applies_clip_skip:
            skip = 1  # A1111 applies clip skip to SD1 only (SD2 is fixed, SDXL has its own)
        elif self.kind == "forge" and skip > family.host_clip_skip_limit:
            # Forge takes hidden_states[-max(n, 1)] for SD2 and [-max(n, 2)] for SDXL; training keeps
            # A1111's fixed layers for those families, so say where the two part.
            console(f"Forge's clip skip {skip} is not applied to {family.label} training prompts "
                    "(they use A1111's layers: SD2 the penultimate, SDXL the penultimate of both encoders)")
        return lambda prompts: encode_prompts(bundle, prompts, clip_skip=skip)

    # ---- running alongside the host -----------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[None]:
        """The host's generation lock for the whole job, and its progress state."""
        from modules import call_queue, devices, shared

        with call_queue.queue_lock:
            shared.state.begin(job="traindeck")
            try:
                yield
            finally:
                shared.state.end()
                release_memory(devices)

    def progress(self, p: Progress) -> None:
        from modules import shared

        state = shared.state
        state.job_count, state.job_no = p.pass_count, p.pass_index - 1
        state.sampling_steps, state.sampling_step = p.total, p.step
        state.textinfo = f"Traindeck: {p.name} {p.phase} {p.step}/{p.total}"
        if getattr(state, "interrupted", False) and self.on_interrupt is not None:
            self.on_interrupt()  # the host's Interrupt button stops (and saves) the job

    def saved(self, path: Path) -> None:
        networks = _module("networks")
        refresh = getattr(networks, "list_available_networks", None)
        if refresh is not None:
            refresh()  # the new file shows in the host's Lora list


def api_auth_setting() -> str | None:
    """The WebUI's --api-auth value ("user:pass,user2:pass2"), if any."""
    from modules import shared

    return getattr(shared.cmd_opts, "api_auth", None)


def register_callbacks(on_ui_tabs: Callable, on_app_started: Callable) -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
