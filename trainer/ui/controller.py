"""What the UI's buttons do, without gradio: one Controller per app, shared by every tab.

The gradio layer only maps widgets to these calls, so the same logic serves the
standalone app, the WebUI tab and the tests.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ..config.schema import TrainConfig
from ..training.engine import Trainer
from ..training.events import Listener, Progress, StopFlag
from ..fsutil import unique_path
from ..jobs.queue import JobQueue
from ..jobs.journal import Job
from ..config.params import ConfigError
from ..paths import cache_dir, jsons_dir, logs_dir, presets_dir
from ..config.presets import list_presets, load_preset, read_json, save_preset
from . import form
from .feed import Feed, describe, job_event, queue_rows

log = logging.getLogger(__name__)

def _listed(field: str, value: str, names: list[str], folders: list[Path]) -> None:
    from ..fsutil import inside
    from ..hosts.base import MODEL_EXTENSIONS

    if not value or value in names:
        return
    given = Path(value).expanduser()
    for folder in folders:
        # a path, or a name inside the folder with or without its extension
        candidates = [given] if given.is_absolute() else [folder / value, *(folder / f"{value}{e}" for e in MODEL_EXTENSIONS)]
        if any(c.exists() and inside(folder, c.resolve()) for c in candidates):
            return
    raise ConfigError(field, value, f"is not in the {field} list; jobs from the UI and API use listed {field}s only")


def _upload_name(path: str) -> str:
    """How an error names an uploaded image: its file name where the browser kept it (gradio 3
    hands every image over as image.png, so there it is only "your upload")."""
    name = Path(path).name
    return "(your upload)" if Path(name).stem == "image" else name


def _renamed(exc: ConfigError, names: Mapping[str, str]) -> ConfigError:
    """`exc` with the stored copies of uploaded images named by the files the user uploaded."""
    value, problem = exc.value, exc.problem
    for copy, name in names.items():
        value = name if value == copy else value
        problem = problem.replace(copy, name)
    return exc if (value, problem) == (exc.value, exc.problem) else ConfigError(exc.key, value, problem)


def _inside_lora(field: str, value: str, lora_dir: Path) -> None:
    from ..fsutil import inside

    if not value:
        return
    path = Path(value).expanduser()
    path = path if path.is_absolute() else lora_dir / path
    if not inside(lora_dir, path.resolve()):
        raise ConfigError(field, value, f"must be a file in the LoRA folder {lora_dir}")


class Controller:
    """The queue, the host and the folders behind the Train, Queue and Plot tabs."""

    def __init__(self, host, queue_file: Path | None = None, *, fallbacks: Mapping[str, str] | None = None,
                 device: str | None = None, listeners: list[Listener] | tuple = (), uploads: Path | None = None):
        self.host = host
        self.device = device
        self.fallbacks = dict(fallbacks or {})
        self.uploads = uploads or cache_dir() / "uploads"
        self._samples: list[str] = []
        self._grid: str | None = None
        self._seen: list[str] = []  # the samples of the last progress event looked at
        self.listeners = [self._note_samples, *listeners]
        self.feed = Feed()
        self.queue = JobQueue(queue_file or cache_dir() / "queue.json", self._run, notify=self._job_changed)

    def _job_changed(self, job: Job) -> None:
        """A job started or ended: the Message box of every open page shows it."""
        self.feed.add(job_event(job))

    def _note_samples(self, p: Progress) -> None:
        """Keep the newest samples, and the evaluation grid apart from them (it has its own image)."""
        if not p.samples or p.samples == self._seen:
            return
        self._seen = list(p.samples)
        from ..training.evalgrid import read_grid_info

        try:
            grid = len(p.samples) == 1 and read_grid_info(p.samples[0]) is not None
        except (OSError, ValueError) as exc:  # an unreadable image must not stop the job that made it
            log.warning("could not read %s: %s", p.samples[0], exc)
            grid = False
        if grid:
            self._grid = p.samples[0]
        else:
            self._samples = list(p.samples)

    def _run(self, cfg: TrainConfig, stop: StopFlag, listener: Listener):
        return Trainer(cfg, self.host, device=self.device, stop=stop, listeners=[listener, *self.listeners]).run()

    # ---- the form -------------------------------------------------------------------
    def config(self, values: Mapping[str, Any], second: Mapping[str, Any] | None = None) -> TrainConfig:
        """A job's config from the form, admitted and pre-checked; uploaded images get a stable copy.

        An error about an uploaded image names the user's file, not the copy it was given.
        """
        values, names = dict(values), {}
        for field in form.IMAGE_FIELDS:
            given = values.get(field)
            values[field] = form.persist_upload(given, self.uploads, field)
            if given:
                names[values[field]] = _upload_name(given)
        try:
            return self.admit(form.config_from(values, second, self.fallbacks))
        except ConfigError as exc:
            raise _renamed(exc, names) from None

    def model_family(self, name: str | None) -> str | None:
        """The family of the model the form names, from its file's header (the fields shown depend on it).

        Empty means the default: the WebUI's loaded checkpoint, or the app's fallback model. None
        when it cannot be told: a name the host does not list, a missing file, a .ckpt, a folder
        that does not say. Only models the host offers are read, as for jobs (see `admit`).
        """
        from ..families import file_family
        from ..hosts.base import find_model

        name = (name or "").strip() or self.fallbacks.get("model", "")
        folders = getattr(self.host, "model_dirs", [])
        resolve = getattr(self.host, "checkpoint_path", None)  # the WebUI's titles -> files
        if not name and resolve is None:
            return None
        try:
            _listed("model", name, self.host.list_models(), folders)
            path = resolve(name) if resolve is not None else find_model(name, folders)
        except ConfigError:
            return None
        return file_family(path)

    def part_files(self) -> list[str]:
        """The files the pickers of a model's separate parts offer (FLUX's text encoders, autoencoder):
        the host's own list where it has one (the WebUI's text encoder and VAE folders), else the
        files in the app's model and VAE folders."""
        from ..hosts.base import model_names

        lister = getattr(self.host, "list_components", None)
        if lister is not None:
            return list(lister())
        folders = [*getattr(self.host, "model_dirs", []), *getattr(self.host, "vae_dirs", [])]
        return model_names(list(dict.fromkeys(folders)), vae=True)

    # ---- jobs -------------------------------------------------------------------------
    def admit(self, cfg: TrainConfig) -> TrainConfig:
        """Jobs from the UI and the API read models and networks only from the host's folders.

        The model and VAE must be listed by the host (or lie inside its model folders), and a
        network to resume or load must lie inside the LoRA folder; paths are resolved (links
        and `..` included) before they are checked. The data folder and images are the user's.
        """
        _listed("model", cfg.model, self.host.list_models(), getattr(self.host, "model_dirs", []))
        _listed("vae", cfg.vae, self.host.list_vaes(), getattr(self.host, "vae_dirs", []))
        lora_dir = Path(self.host.lora_dir())
        for field in ("network_resume", "diff_load_1st_pass"):
            _inside_lora(field, getattr(cfg, field), lora_dir)
        from ..jobs.precheck import precheck

        return precheck(cfg, lora_dir, self.host)

    def start(self, cfg: TrainConfig) -> str:
        """Queue the job and start the worker; returns at once."""
        job = self.queue.add(self.admit(cfg))
        self.queue.start()
        ahead = sum(1 for row in self.queue.snapshot() if row["state"] in ("queued", "running")) - 1
        text = f"queued {job.name}" + (f" ({ahead} ahead)" if ahead > 0 else "") + "; training starts in turn"
        self.feed.add(text)
        return text

    def add(self, cfg: TrainConfig) -> str:
        job = self.queue.add(self.admit(cfg))
        text = f"added {job.name} to the queue (press Start to run it)"
        self.feed.add(text)
        return text

    def stop(self, save: bool) -> str:
        if not self.queue.stop(save):
            return "nothing is training"
        return "stopping and saving what it has" if save else "stopping without saving"

    def status(self) -> str:
        p = self.queue.current()
        if p is not None:
            return describe(p)
        rows = self.queue.snapshot()
        waiting = sum(1 for r in rows if r["state"] == "queued")
        last = next((r for r in reversed(rows) if r["state"] not in ("queued", "running")), None)
        text = "idle" + (f", {waiting} queued (press Start)" if waiting else "")
        if last is not None:
            text += f" | last: {last['name']} {last['state']}: {last['message']}"
        return text

    def queue_rows(self) -> list[list[Any]]:
        return queue_rows(self.queue.snapshot())

    def job_choices(self) -> list[str]:
        """One "<id> <name>" per job: no state in it, so a pick stays valid while its job runs and ends."""
        return [f"{r['id']} {r['name']}" for r in self.queue.snapshot()]

    @staticmethod
    def job_id(choice: str | None) -> str:
        if not choice:
            raise ConfigError("job", choice, "choose a job in the list first")
        return choice.split(" ", 1)[0]

    # ---- presets and settings files --------------------------------------------------------
    def presets(self) -> list[str]:
        return list_presets(presets_dir())

    def load_preset(self, name: str) -> tuple[TrainConfig, list[str]]:
        if name not in self.presets():  # a name from presets/, never a path elsewhere
            raise ConfigError("preset", name, "choose a preset from the list")
        warnings: list[str] = []
        return load_preset(name, presets_dir(), warnings=warnings), warnings

    def save_preset(self, name: str, cfg: TrainConfig, overwrite: bool = False) -> Path:
        return save_preset(cfg, name, presets_dir(), overwrite=overwrite)

    def settings_files(self) -> list[str]:
        base = jsons_dir()
        if not base.is_dir():
            return []
        return sorted((p.relative_to(base).as_posix() for p in base.rglob("*.json")), reverse=True)

    def load_settings(self, name: str) -> TrainConfig:
        """A run's settings JSON by its name inside the jsons folder (nothing outside it)."""
        from ..fsutil import inside

        text = (name or "").strip()
        path = (jsons_dir() / text).resolve()
        if not text or ".." in Path(text).parts or Path(text).is_absolute() or not inside(jsons_dir(), path):
            raise ConfigError("settings", name, "give a settings file name from the list (inside jsons/)")
        data = read_json(path, field="settings")
        if not isinstance(data, dict):
            raise ConfigError("settings", name, "is not an object of settings")
        return TrainConfig.from_dict(data)

    # ---- plots and samples ----------------------------------------------------------------
    def current_log(self) -> str | None:
        """The running job's log, else the most recent one, as a name inside logs/."""
        from ..training.plot import log_names

        names = log_names(logs_dir())
        return names[0] if names else None

    def save_plot(self, name: str) -> Path:
        from ..training.plot import loss_figure, resolve_log, save_png

        path = resolve_log(name, logs_dir())
        return save_png(loss_figure(path), unique_path(path.with_suffix(".png")))

    def samples(self) -> list[str]:
        """The newest sample images of the running (or last) job."""
        return [p for p in self._samples if Path(p).is_file()]

    def grid(self) -> str | None:
        """The evaluation grid of the last job that rendered one (eval_grid)."""
        return self._grid if self._grid and Path(self._grid).is_file() else None

    def preview(self, cfg: TrainConfig, which: str) -> list:
        """iLECO's "Generate original/target": the base model on one prompt, at the training size."""
        from ..training.devices import compute_dtype, pick_device
        from ..training.samples import render_samples

        if self.queue.running:
            raise ConfigError("preview", which, "a job is training; previews run when the queue is idle")
        prompt = cfg.original_prompt if which == "original" else cfg.target_prompt
        device = pick_device(self.device)
        with self.host.session():
            bundle = self.host.load_bundle(cfg, dtype=compute_dtype(cfg.train_model_precision, device), device=device)
            return render_samples(bundle, [prompt], negative_prompt=cfg.negative_prompt, steps=cfg.sample_steps,
                                  size=tuple(cfg.image_size), seed=max(cfg.train_seed, 0), device=device)

    def close(self) -> None:
        self.queue.close(timeout=5.0)
