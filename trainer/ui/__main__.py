"""python -m trainer.ui [--models DIR] [--lora-dir DIR] [--port N]: the standalone app on 127.0.0.1."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..paths import ROOT, logs_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.ui", description="Traindeck's standalone UI.")
    p.add_argument("--models", action="append", default=[], help="folder of checkpoints/diffusers models (repeatable)")
    p.add_argument("--lora-dir", default=str(ROOT / "output"), help="where networks are written (default ./output)")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--demo", action="store_true", help="use the built-in demo model and images")
    p.add_argument("--device", help="force a torch device, e.g. cpu")
    p.add_argument("--queue", help="the queue's journal file (default cache/queue.json)")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """(App, Controller) for the arguments; the demo steps in when no model is found."""
    from ..config.schema import TrainConfig
    from ..hosts.base import StandaloneHost, model_names
    from ..config.presets import load_preset
    from .app import App
    from .controller import Controller

    model_dirs = [Path(d).expanduser() for d in (args.models or [ROOT / "models"])]
    fallbacks: dict[str, str] = {}
    initial = TrainConfig()
    if args.demo or not model_names(model_dirs):
        from ..demo import DEMO_MODEL, ensure_demo

        demo_models, demo_images = ensure_demo()
        model_dirs.append(demo_models)
        # An empty model means the demo's; its images are filled in the form, where the user sees
        # them: an empty image folder is refused rather than quietly replaced by the demo's.
        fallbacks = {"model": DEMO_MODEL}
        initial = load_preset("LoRA_Demo").with_overrides({**fallbacks, "lora_data_directory": str(demo_images)})
        logging.getLogger(__name__).warning("no model found in %s: using the built-in demo model",
                                            ", ".join(map(str, model_dirs[:-1])))
    host = StandaloneHost(Path(args.lora_dir), model_dirs)
    ctl = Controller(host, Path(args.queue) if args.queue else None, fallbacks=fallbacks, device=args.device)
    return App(ctl, initial), ctl


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    app, ctl = build(args)
    from .compat import enable_queue

    enable_queue(app.blocks)
    allowed = [str(Path(args.lora_dir).resolve()), str(logs_dir())]
    try:
        app.blocks.launch(server_name=args.host, server_port=args.port, allowed_paths=allowed, show_api=False)
    finally:
        ctl.close()


if __name__ == "__main__":
    main()
