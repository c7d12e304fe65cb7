"""What scripts/traindeck.py registers: the Traindeck tab and the API routes.

The controller (and with it the queue and its worker) is made once per process and
kept across the WebUI's "Reload UI", which rebuilds the tab but not this package.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
_CONTROLLER: list[Any] = []  # the one controller of this process (the queue lives in it)
_MOUNTED: set[int] = set()   # FastAPI apps the routes were added to (on_app_started runs per reload)


def controller():
    if not _CONTROLLER:
        from ..ui.controller import Controller
        from .webui import WebUIHost

        host = WebUIHost()
        ctl = Controller(host)
        host.on_interrupt = lambda: ctl.queue.stop(save=True)
        _CONTROLLER.append(ctl)
    return _CONTROLLER[0]


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    from ..ui.app import App
    from .webui import host_kind

    kind, description = host_kind()
    notice = None if kind != "unsupported" else f"Warning: {description}."
    return [(App(controller(), standalone=False, notice=notice).blocks, "Traindeck", "traindeck")]


def on_app_started(_demo: Any, app: Any) -> None:
    from ..jobs.api import mount, parse_api_auth
    from .webui import api_auth_setting

    if id(app) in _MOUNTED:
        return
    credentials = parse_api_auth(api_auth_setting())
    mount(app, controller(), credentials)
    _MOUNTED.add(id(app))
    if credentials is None:
        log.warning("Traindeck API is open (no --api-auth): like the WebUI's own API, anyone who can reach "
                    "this server can queue jobs; start the WebUI with --api-auth user:password to protect it")


def register() -> None:
    from .webui import host_kind, register_callbacks

    kind, description = host_kind()
    (log.warning if kind == "unsupported" else log.info)("Traindeck on %s", description)
    register_callbacks(on_ui_tabs, on_app_started)
