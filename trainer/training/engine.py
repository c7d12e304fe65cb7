"""THE training loop. Modes plug in as strategies (trainer/modes/)."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import devices
from ..config.schema import TrainConfig
from .events import JobStopped, Listener, Progress, StopFlag
from ..hosts.base import Host
from ..modes import get_mode
from ..modes.base import PassInfo, PassSpec, StepContext
from .outputs import OutputPlan, plan_outputs
from .passrun import PassRunner

if TYPE_CHECKING:
    from .distributed import DataParallel

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The job could not finish (NaN loss, out of memory); files saved so far are kept."""


@dataclass
class RunResult:
    status: str                      # done | stopped
    output: Path | None
    steps: int
    loss_first: float | None
    loss_last: float | None
    seconds: float
    seed: int
    message: str = ""
    saved: list[Path] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    settings_file: Path | None = None

    def summary(self) -> dict[str, Any]:
        """The CLI's final JSON line."""
        return {"output": str(self.output) if self.output else None, "steps": self.steps,
                "loss_first": self.loss_first, "loss_last": self.loss_last,
                "seconds": round(self.seconds, 3), "status": self.status, "seed": self.seed}


def resolve_seed(seed: int) -> int:
    """-1 draws a seed; the drawn one is what gets recorded."""
    return seed if seed >= 0 else random.SystemRandom().randrange(0, 2**31 - 1)


class Trainer:
    """Runs one job: every pass of its mode, on one host, with one stop flag."""

    def __init__(self, cfg: TrainConfig, host: Host, *, device: torch.device | str | None = None,
                 stop: StopFlag | None = None, listeners: list[Listener] | tuple = (),
                 parallel: DataParallel | None = None):
        self.cfg = cfg
        self.host = host
        # Data-parallel ranks come from the CLI only; the WebUI's trainer stays one process.
        self.parallel = parallel
        self.device = parallel.device if parallel else (
            device if isinstance(device, torch.device) else devices.pick_device(device))
        self.stop = stop or StopFlag()
        self.listeners = list(listeners)
        self.progress = Progress(mode=cfg.mode, name=cfg.save_lora_name)

    # ---- events --------------------------------------------------------
    def emit(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.progress, key, value)
        snapshot = Progress(**self.progress.as_dict())
        self.host.progress(snapshot)
        for listener in self.listeners:
            listener(snapshot)

    # ---- the job -------------------------------------------------------
    def run(self) -> RunResult:
        """Train; returns on done/stopped, raises ConfigError / TrainingFailed otherwise."""
        started = time.time()
        cfg = self.cfg.validate()
        mode = get_mode(cfg.mode)
        if self.parallel:
            cfg = self.cfg = self.parallel.configure(cfg)
            mode = self.parallel.wrap_mode(mode)
        specs = mode.passes(cfg)
        plans = [plan_outputs(s.cfg, self.host.lora_dir(), s.suffix) if s.save else None for s in specs]
        if self.parallel and not self.parallel.ranks.is_main:
            plans = [None] * len(specs)  # every rank checked the names; only rank 0 saves
        seed = resolve_seed(cfg.train_seed)
        if self.parallel:
            seed = self.parallel.same_seed(seed)
        result = RunResult("done", None, 0, None, None, 0.0, seed)
        if cfg.save_as_json:
            from ..config.presets import save_run_settings

            result.settings_file = save_run_settings(cfg, seed, started)
        self.emit(phase="loading", pass_count=len(specs), message="loading model")
        try:
            with self.host.session():
                self._run_passes(mode, specs, plans, seed, started, result)
        except JobStopped:
            result.status = "stopped"
        finally:
            result.seconds = time.time() - started
        if result.status == "stopped":
            saved = f"; saved {result.output}" if result.output else "; nothing saved"
            result.message = f"stopped at step {result.steps}{saved}"
        self.emit(phase=result.status, message=result.message)
        return result

    def _run_passes(self, mode, specs: list[PassSpec], plans: list[OutputPlan | None], seed: int,
                    started: float, result: RunResult) -> None:
        model_dtype = devices.compute_dtype(self.cfg.train_model_precision, self.device)
        bundle = self.host.load_bundle(self.cfg, dtype=model_dtype, device=self.device)
        # settings the model's family cannot train with fail before any caching; what it leaves out is
        # said now and again in the job's final message
        notes = list(dict.fromkeys(m for spec in specs for m in bundle.family.check(spec.cfg)))
        for message in notes:
            log.warning(message)
            self.emit(message=message)
        trains_on = bundle.extra.get("trains_on", "")  # a host says which model and from where
        if trains_on:
            self.emit(message=trains_on)
        loaded = next(bundle.unet.parameters()).dtype
        if loaded != model_dtype:  # a WebUI's model is used in its own precision rather than copied
            log.info("the model is held in %s; training runs in that precision", loaded)
            model_dtype = loaded
        frozen: list = []
        try:
            for index, (spec, plan) in enumerate(zip(specs, plans), start=1):
                if index > 1 and self.stop.requested:
                    raise JobStopped()  # between passes: the next one does not even start
                self.emit(pass_index=index, total=spec.cfg.train_iterations, step=0)
                bundle.family.prepare(bundle, spec.cfg, self.device)
                runner = PassRunner(self, mode, spec, plan, bundle, model_dtype, seed, started, frozen, index)
                out = runner.run(result)
                if out is not None and spec.keep_applied:
                    frozen.append(out)
                if runner.final_message:
                    result.message = runner.final_message
            result.message = "; ".join(m for m in (result.message, trains_on, *notes) if m)
        finally:
            for network in reversed(frozen):
                network.remove()
            if self.parallel:
                self.parallel.detach()
            devices.empty_cache(self.device)
        if self.cfg.eval_grid and result.saved:  # on the plain model again, its saves applied one by one
            from .evalgrid import render_grid

            render_grid(self, bundle, specs, result)

    def make_context(self, spec: PassSpec, bundle, network, model_dtype: torch.dtype, seed: int,
                     frozen: list) -> StepContext:
        """The StepContext a mode sees for one pass."""
        from ..families.textenc import encode_prompts

        gen = torch.Generator(device=self.device).manual_seed(seed)
        host_encode = self.host.encode_fn(bundle)

        def encode(prompts: list[str]):
            return host_encode(prompts) if host_encode is not None else encode_prompts(bundle, prompts)

        def encode_grad(prompts: list[str]):
            return encode_prompts(bundle, prompts, grad=True)

        def report(message: str, done: int, total: int) -> None:
            self.emit(phase="caching", message=f"{message} {done}/{total}" if total else message)
            if self.stop.requested:
                raise JobStopped()

        ctx = StepContext(
            cfg=spec.cfg, bundle=bundle, network=network, device=self.device, dtype=model_dtype,
            seed=seed, generator=gen, stop=self.stop, encode=encode, encode_grad=encode_grad,
            autocast=lambda: devices.autocast(self.device, model_dtype), report=report, frozen=frozen,
            spec=spec,
        )
        if self.parallel:
            self.parallel.attach(ctx)
        return ctx


__all__ = ["Trainer", "RunResult", "TrainingFailed", "PassInfo", "resolve_seed"]
