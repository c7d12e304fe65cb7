"""One pass of the training loop: network, optimizer, steps, logs and saves."""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import devices
from .ema import EmaWeights, applied
from .schedule_free import eval_weights
from .events import JobStopped
from .losses import Ema
from ..modes.base import PassInfo, PassSpec
from .outputs import OutputPlan, find_network_file
from ..config.params import ConfigError

if TYPE_CHECKING:
    from .engine import RunResult, Trainer

log = logging.getLogger(__name__)


class PassRunner:
    """Trains (or loads) the network of one PassSpec."""

    def __init__(self, trainer: "Trainer", mode, spec: PassSpec, plan: OutputPlan | None, bundle,
                 model_dtype: torch.dtype, seed: int, started: float, frozen: list, index: int = 1):
        self.t, self.mode, self.spec, self.plan, self.index = trainer, mode, spec, plan, index
        self.cfg = spec.cfg
        self.bundle, self.model_dtype, self.seed, self.started, self.frozen = bundle, model_dtype, seed, started, frozen
        self.info = PassInfo()
        self.final_message = ""
        self.steps_done = 0
        self.training = False  # True once the step loop runs (for messages)
        self.csv = None
        self._written: set[Path] = set()
        self.resume_file: Path | None = None  # the network_resume file, once found
        self.resume = None  # its ResumeState when a <name>-state/ folder is next to it
        self.live = None  # trainstate.Live while the step loop runs (for save_state)
        self.unplace_denoiser = None  # undoes the family's placement of the denoiser (block swap)

    # ---- set-up ----------------------------------------------------------
    def _build_network(self):
        from ..networks.network import Network

        # Each pass's initial weights follow from the seed alone, whatever ran before it.
        with devices.seeded(self.seed + self.index, next(self.bundle.unet.parameters()).device):
            network = Network.build(self.bundle, self.cfg)
        source = self.spec.load_from or self.cfg.network_resume
        if source:
            field = "diff_load_1st_pass" if self.spec.load_from else "network_resume"
            path = find_network_file(source, self.t.host.lora_dir())
            if path is None:
                network.remove()
                raise ConfigError(field, source, f"no such file (also looked in {self.t.host.lora_dir()})")
            try:
                network.load_weights(path)
            except BaseException:
                network.remove()
                raise
            if not self.spec.load_from:
                self.resume_file = path
        return network

    def _place_modules(self, trains_te: bool) -> None:
        """Frozen weights on the device; gradient checkpointing as asked."""
        dev = self.t.device
        self.unplace_denoiser = self.bundle.family.place(self.bundle, self.cfg, dev)
        for te in self.bundle.text_encoders:
            te.to(dev)
        if self.cfg.use_gradient_checkpointing:
            self.bundle.unet.enable_gradient_checkpointing()
            if trains_te:
                for te in self.bundle.text_encoders:
                    te.gradient_checkpointing_enable()

    def _unplace(self) -> None:
        if self.unplace_denoiser is not None:
            self.unplace_denoiser()
            self.unplace_denoiser = None
        if self.cfg.use_gradient_checkpointing:
            self.bundle.unet.disable_gradient_checkpointing()
            for te in self.bundle.text_encoders:
                if getattr(te, "is_gradient_checkpointing", False):
                    te.gradient_checkpointing_disable()
        self.bundle.unet.eval()
        for te in self.bundle.text_encoders:
            te.eval()

    # ---- the pass --------------------------------------------------------
    def run(self, result: "RunResult"):
        """Train the pass; returns the network when it stays applied, else None."""
        network = self._build_network()
        keep = False
        try:
            self._place_modules(network.trains_text_encoder)
            network.to(self.t.device)  # not a submodule of the models: it moves on its own
            ctx = self.t.make_context(self.spec, self.bundle, network, self.model_dtype, self.seed, self.frozen)
            if self.spec.load_from:
                keep = self.spec.keep_applied
                return self._frozen(network) if keep else None
            # optimizer first: a bad setting fails before minutes of caching
            opt, sched = self._optimizer(network)
            if self.resume_file is not None:
                from .resume import open_resume
                from .state import trainable

                self.resume = open_resume(self.resume_file, self.cfg)
                if self.resume is not None:
                    self.resume.restore_training(trainable(opt), opt, sched)
            self.info = self.mode.prepare(ctx)
            self._train(ctx, network, opt, sched, result)
            keep = self.spec.keep_applied
            return self._frozen(network) if keep else None
        except torch.OutOfMemoryError:
            devices.empty_cache(self.t.device)
            where = f"at step {self.steps_done + 1}" if self.training else "while preparing the data"
            self._failed(f"out of memory {where}; try a smaller batch or image size, "
                         "gradient checkpointing, or a lower precision", result)
        finally:
            if self.csv is not None:
                self.csv.close()
            self._unplace()
            if not keep:
                network.remove()

    @staticmethod
    def _frozen(network):
        """The network stays in the model for the next pass but no longer trains."""
        for group in network.param_groups(0.0, 0.0):
            for p in group["params"]:
                p.requires_grad_(False)
        return network

    def _optimizer(self, network):
        from .optim import build_optimizer, build_scheduler

        c = self.cfg
        groups = network.param_groups(c.train_learning_rate, c.text_encoder_lr)
        opt = build_optimizer(c.train_optimizer, groups, c.train_learning_rate, c.train_optimizer_settings)
        sched = build_scheduler(
            c.train_lr_scheduler, opt, total_steps=c.train_iterations, warmup_steps=c.train_lr_warmup_steps,
            num_cycles=c.train_lr_scheduler_num_cycles, power=c.train_lr_scheduler_power,
            step_rules=c.train_lr_step_rules, settings_text=c.train_lr_scheduler_settings)
        return opt, sched

    def _start_loop(self, ctx, opt, sched, scaler) -> int:
        """EMA, batch counting and a resumed state in place; returns the first step to train."""
        from .state import Live, track_batches, trainable

        ema = EmaWeights(trainable(opt), self.cfg.ema_decay) if self.cfg.ema_decay > 0 else None
        self.live = Live(ctx, opt, sched, scaler, ema, track_batches(ctx.state))
        if self.resume is None:
            return 1
        self.resume.restore_loop(ema, scaler)
        self.resume.restore_data(ctx, self.live.batches)
        self.steps_done = self.resume.step
        return self.resume.step + 1

    def _open_log(self, groups: list[dict]) -> None:
        from .runlog import CsvLog, HEADER_KEYS, log_path

        if not self.cfg.logging_save_csv:
            return
        header = {k: getattr(self.cfg, k, "") for k in HEADER_KEYS if k != "model_version"}
        header["model_version"] = self.bundle.family.model_version
        header["train_seed"] = self.seed
        header["network_type"] = self.cfg.network_type
        # which optimizer group each "Learning Rate N" column is (U-Net, text encoder, LoRA+ up, a block)
        header["lr_groups"] = ";".join(str(g.get("name") or f"group{i}") for i, g in enumerate(groups, start=1))
        if self.resume is not None:
            header["resumed_from_step"] = self.resume.step
        from ..fsutil import unique_path

        # two jobs of one name may start within the same second
        path = unique_path(log_path(self.cfg.save_lora_name, self.started, self.spec.suffix))
        self.csv = CsvLog(path, header, len(groups))

    def _train(self, ctx, network, opt, sched, result: "RunResult") -> None:
        scaler = torch.amp.GradScaler(self.t.device.type) if self.model_dtype == torch.float16 else None
        first = self._start_loop(ctx, opt, sched, scaler)
        self._open_log(opt.param_groups)
        if self.csv is not None:
            result.logs.append(self.csv.path)
        self.bundle.unet.train()
        ema, times = Ema(), deque(maxlen=20)
        total = self.cfg.train_iterations
        result.loss_first = result.loss_last = None  # the job's losses are those of its last trained pass
        result.steps = first - 1
        self.t.emit(phase="training", step=first - 1, total=total, message=self.spec.label or "training")
        self.training = True
        for step in range(first, total + 1):
            if self.t.stop.requested:
                self._stopped(network, opt, result)
            tick = time.perf_counter()
            loss = self.mode.loss(ctx, step)
            raw = float(loss.detach())
            if not math.isfinite(raw):
                self._failed(f"loss became {raw} at step {step}", result)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if self.live.ema is not None:
                self.live.ema.update()
            self.steps_done = result.steps = step
            smooth = ema.update(raw)
            if result.loss_first is None:
                result.loss_first = raw
            result.loss_last = raw
            times.append(time.perf_counter() - tick)
            self._after_step(step, total, raw, smooth, sched, times, network, opt, result)
        self._save(network, opt, self.plan.final if self.plan else None, result, final=True)

    def _after_step(self, step, total, raw, smooth, sched, times, network, opt, result) -> None:
        lrs = [float(x) for x in sched.get_last_lr()]
        if self.csv is not None:
            self.csv.row(step, smooth, lrs, raw)
        per_step = sum(list(times)[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
        self.t.emit(step=step, loss=raw, loss_ema=smooth, lrs=lrs, it_per_s=1.0 / per_step if per_step else None,
                    eta_s=per_step * (total - step))
        if self.plan and step in self.plan.intermediate:
            self._save(network, opt, self.plan.intermediate[step], result, final=False)
        every = self.cfg.sample_every_n_steps
        if every and (step % every == 0 or step == total):
            self._sample(step)

    def _sample(self, step: int) -> None:
        """Render the sample prompts with the weights a save now would write (samples/ next to the LoRA).

        With EMA, or a schedule-free optimizer, those are the averaged weights, not the raw ones.
        """
        from .samples import parse_prompts, render_samples, save_samples

        c = self.cfg
        self.t.emit(message=f"rendering samples at step {step}")
        with eval_weights(self.live.optimizer), applied(self.live.ema):
            images = render_samples(self.bundle, parse_prompts(c.sample_prompts), negative_prompt=c.negative_prompt,
                                    steps=c.sample_steps, size=tuple(c.image_size), seed=self.seed,
                                    device=self.t.device)
        folder = self.t.host.lora_dir() / f"{c.save_lora_name}_samples"
        paths = save_samples(images, folder, f"{c.save_lora_name}{self.spec.suffix}_{step:06d}steps")
        self.t.emit(samples=[str(p) for p in paths], message=f"samples at step {step}")

    # ---- endings ---------------------------------------------------------
    def _save(self, network, opt, path: Path | None, result: "RunResult", final: bool) -> None:
        if path is None or not self.spec.save:
            return
        from ..networks.network import build_metadata

        self.t.emit(phase="saving", message=f"saving {path.name}")
        meta = build_metadata(
            self.cfg, self.bundle, seed=self.seed, steps=self.steps_done, started_at=self.started,
            finished_at=time.time(), num_images=self.info.num_images, tag_frequency=self.info.tag_frequency,
            resolution=tuple(self.info.resolution), extra_settings={"train_seed": self.seed})
        overwrite = self.cfg.save_overwrite or path in self._written
        # schedule-free optimizers hold their averaged weights only in eval mode; EMA weights replace them
        with eval_weights(opt), applied(self.live.ema if self.live else None):
            network.save(path, dtype=devices.DTYPES[self.cfg.save_precision], metadata=meta,
                         overwrite=overwrite, strength=self.cfg.network_strength)
        if self.cfg.save_state and self.live is not None:
            from .outputs import state_path
            from .state import write_state

            write_state(state_path(path), self.live, self.cfg, self.steps_done, path, overwrite)
        self._written.add(path)
        result.saved.append(path)
        if final:
            result.output = path
            self.final_message = f"saved {path}"
        self.t.host.saved(path)
        self.t.emit(phase="training", message=f"saved {path.name}")

    def _stopped(self, network, opt, result: "RunResult") -> None:
        if self.t.stop.save and self.steps_done > 0 and self.plan is not None:
            self._save(network, opt, self.plan.final, result, final=True)
        raise JobStopped()

    def _failed(self, why: str, result: "RunResult") -> None:
        from .engine import TrainingFailed

        kept = ", ".join(str(p) for p in result.saved) or "nothing was saved"
        raise TrainingFailed(f"{why}; the job stopped. Files kept: {kept}")
