"""The Queue and Plot tabs."""
from __future__ import annotations

import json

import gradio as gr

from ..paths import logs_dir
from .compat import make, on
from .controller import Controller
from .feed import QUEUE_HEADERS
from .train_tab import guarded


class QueueTab:
    """The queue as a table, with start, delete, up, down and clear."""

    def __init__(self, ctl: Controller):
        self.ctl = ctl
        self.table = make(gr.Dataframe, value=ctl.queue_rows() or None, headers=QUEUE_HEADERS, interactive=False,
                          wrap=True, col_count=(len(QUEUE_HEADERS), "fixed"), elem_id="traindeck-queue-table")
        with gr.Row():
            # allow_custom_value: a pick whose job another page removed reaches the handler, which
            # says so, instead of gradio 4 refusing the value on its own
            self.job = make(gr.Dropdown, choices=ctl.job_choices(), value=None, label="Job", allow_custom_value=True,
                            elem_id="traindeck-queue-job", scale=3)
            self.start = make(gr.Button, value="Start queue", variant="primary", elem_id="traindeck-queue-start")
            self.up = make(gr.Button, value="Up", elem_id="traindeck-queue-up")
            self.down = make(gr.Button, value="Down", elem_id="traindeck-queue-down")
            self.delete = make(gr.Button, value="Delete", elem_id="traindeck-queue-delete")
            self.clear = make(gr.Button, value="Clear", elem_id="traindeck-queue-clear")
            self.refresh = make(gr.Button, value="Refresh", elem_id="traindeck-queue-refresh")
        self.message = make(gr.Textbox, label="Message", interactive=False, elem_id="traindeck-queue-message")

    def view(self, note: str = "", keep: str | None = None) -> list:
        """Table, job list (keeping the pick while it exists) and message."""
        choices = self.ctl.job_choices()
        ids = {c.split(" ", 1)[0]: c for c in choices}
        pick = ids.get(self.ctl.job_id(keep)) if keep else None
        rows = self.ctl.queue_rows()
        return [gr.update(value=rows or [[""] * len(QUEUE_HEADERS)]), gr.update(choices=choices, value=pick), note]

    def poll(self, seen: str) -> list:
        """Every few seconds: the table and the job list together, when either changed since this
        page last got them. The pick is left alone (its label names the job, not its state, so it
        stays valid while the job is listed)."""
        rows, choices = self.ctl.queue_rows(), self.ctl.job_choices()
        now = json.dumps([rows, choices], default=str)
        if now == seen:
            return [gr.update(), gr.update(), seen]
        return [gr.update(value=rows or [[""] * len(QUEUE_HEADERS)]), gr.update(choices=choices), now]

    def _act(self, action) -> callable:
        def run(choice: str | None) -> list:
            return self.view(action(choice), keep=choice)
        return guarded(run, 3)

    def _delete(self, choice):
        self.ctl.queue.remove(self.ctl.job_id(choice))
        return "deleted"

    def _move(self, offset: int):
        def move(choice):
            pos = self.ctl.queue.move(self.ctl.job_id(choice), offset)
            return f"moved to position {pos + 1}"
        return move

    def _start(self, choice):
        return "started" if self.ctl.queue.start() else "nothing to run"

    def _clear(self, choice):
        return f"cleared {self.ctl.queue.clear()} jobs"

    def wire(self) -> None:
        outs = [self.table, self.job, self.message]
        on(self.refresh.click, self._act(lambda c: ""), [self.job], outs, "traindeck_queue_refresh")
        on(self.start.click, self._act(self._start), [self.job], outs, "traindeck_queue_start")
        on(self.delete.click, self._act(self._delete), [self.job], outs, "traindeck_queue_delete")
        on(self.up.click, self._act(self._move(-1)), [self.job], outs, "traindeck_queue_up")
        on(self.down.click, self._act(self._move(1)), [self.job], outs, "traindeck_queue_down")
        on(self.clear.click, self._act(self._clear), [self.job], outs, "traindeck_queue_clear")


class PlotTab:
    """Raw and smoothed loss with the learning rate, for the running or a chosen log."""

    def __init__(self, ctl: Controller):
        from ..training.plot import log_names

        self.ctl = ctl
        with gr.Row():
            self.log = make(gr.Dropdown, choices=log_names(logs_dir()), value=ctl.current_log(), label="Log",
                            allow_custom_value=True, elem_id="traindeck-plot-log", scale=4)
            self.refresh = make(gr.Button, value="Refresh", elem_id="traindeck-plot-refresh", scale=1)
            self.live = make(gr.Checkbox, value=True, label="Follow the newest log", elem_id="traindeck-plot-live")
            self.save = make(gr.Button, value="Save PNG", elem_id="traindeck-plot-save", scale=1)
        self.plot = make(gr.Plot, label="Loss", elem_id="traindeck-plot")
        self.file = make(gr.File, label="PNG", interactive=False, elem_id="traindeck-plot-file")
        self.message = make(gr.Textbox, label="Message", interactive=False, elem_id="traindeck-plot-message")
        self._shown: tuple[str, float] | None = None  # (log name, its mtime) last drawn

    def draw(self, name: str | None) -> list:
        from ..training.plot import figure_of, log_names, resolve_log
        from ..training.runlog import read_log

        names = log_names(logs_dir())
        name = name or (names[0] if names else None)
        if not name:
            return [gr.update(choices=names), None, "no logs yet"]
        path = resolve_log(name, logs_dir())
        self._shown = (name, path.stat().st_mtime)
        header, frame = read_log(path)
        return [gr.update(choices=names, value=name), figure_of(header, frame, path.stem),
                f"{name}: {len(frame)} steps"]

    def poll(self, live: bool) -> list:
        """While following, redraw the newest log when it changed; otherwise leave the plot be."""
        unchanged = [gr.update(), gr.update(), gr.update()]
        newest = self.ctl.current_log() if live else None
        if newest is None:
            return unchanged
        mtime = (logs_dir() / newest).stat().st_mtime
        return unchanged if self._shown == (newest, mtime) else self.draw(newest)

    def wire(self) -> None:
        outs = [self.log, self.plot, self.message]
        on(self.refresh.click, guarded(self.draw, 3), [self.log], outs, "traindeck_plot_refresh")
        on(self.log.change, guarded(self.draw, 3), [self.log], outs, "traindeck_plot_pick")
        on(self.save.click, guarded(lambda name: [str(self.ctl.save_plot(name)), "saved"], 2), [self.log],
           [self.file, self.message], "traindeck_plot_save")
