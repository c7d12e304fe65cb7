"""The UI as one gr.Blocks: Train, Queue and Plot tabs over one Controller.

The WebUI mounts the same Blocks as a tab; the standalone app launches it.
"""
from __future__ import annotations

import gradio as gr

from ..config.schema import TrainConfig
from ..paths import ROOT
from .compat import every, make, run_js_on_load
from .controller import Controller
from .queue_tab import PlotTab, QueueTab
from .train_tab import TrainTab

STATUS_SECONDS, TABLE_SECONDS, PLOT_SECONDS = 1.0, 2.0, 3.0


def assets() -> tuple[str, str]:
    """(css, js) from style.css and javascript/*.js, which the WebUI also serves itself."""
    css = (ROOT / "style.css").read_text(encoding="utf-8") if (ROOT / "style.css").is_file() else ""
    js = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "javascript").glob("*.js")))
    return css, js


class App:
    """Holds the tabs so tests can reach every component and handler."""

    def __init__(self, ctl: Controller, initial: TrainConfig | None = None, *, standalone: bool = True,
                 notice: str | None = None):
        self.ctl = ctl
        css, js = assets()
        with make(gr.Blocks, title="Traindeck", analytics_enabled=False, css=css if standalone else None,
                  elem_id="traindeck") as self.blocks:
            if notice:
                make(gr.Markdown, value=f"**{notice}**", elem_id="traindeck-notice")
            with gr.Tabs():
                with make(gr.Tab, label="Train", elem_id="traindeck-tab-train"):
                    self.train = TrainTab(ctl, initial or TrainConfig())
                with make(gr.Tab, label="Queue", elem_id="traindeck-tab-queue"):
                    self.queue = QueueTab(ctl)
                with make(gr.Tab, label="Plot", elem_id="traindeck-tab-plot"):
                    self.plot = PlotTab(ctl)
            if standalone and js:
                run_js_on_load(self.blocks, js)  # the WebUI serves javascript/*.js itself
            self.train.wire()
            self.queue.wire()
            self.plot.wire()
            # What this page has shown of the event feed and of the queue (one State per page).
            self.feed_seen = make(gr.State, value=0)
            self.queue_seen = make(gr.State, value="")
            every(self.blocks, STATUS_SECONDS, self.poll_status, [self.feed_seen],
                  [self.train.status, self.train.gallery, self.train.grid, self.train.message, self.feed_seen],
                  "traindeck_poll_status", carry=0)
            every(self.blocks, TABLE_SECONDS, self.queue.poll, [self.queue_seen],
                  [self.queue.table, self.queue.job, self.queue_seen], "traindeck_poll_queue", carry=0)
            every(self.blocks, PLOT_SECONDS, self.plot.poll, [self.plot.live],
                  [self.plot.log, self.plot.plot, self.plot.message], "traindeck_poll_plot")
        self._samples: list[str] = []
        self._grid: str | None = self.ctl.grid()

    def poll_status(self, seen: int = 0) -> list:
        """The status line; the sample gallery and the evaluation grid when new ones appeared; the
        newest event (a job added, started, done or failed) in the Message box if this page has not
        shown it yet."""
        samples = [str(p) for p in self.ctl.samples()]
        gallery = gr.update(value=samples) if samples != self._samples else gr.update()
        self._samples = samples
        grid = self.ctl.grid()
        image = gr.update(value=grid) if grid != self._grid else gr.update()
        self._grid = grid
        newest, event = self.ctl.feed.since(seen or 0)
        message = gr.update(value=event) if event is not None else gr.update()
        return [self.ctl.status(), gallery, image, message, newest]


def build_ui(ctl: Controller, initial: TrainConfig | None = None, *, standalone: bool = True) -> gr.Blocks:
    return App(ctl, initial, standalone=standalone).blocks


__all__ = ["App", "build_ui"]
