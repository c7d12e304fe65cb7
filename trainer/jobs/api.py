"""REST API under the extension's own prefix (/traindeck/v1): presets, schema, queue, status, logs.

Routes added in `on_app_started` get no protection from the host, so with the host's
`--api-auth` credentials every route checks HTTP Basic itself, as the host's API does; without
them the API is open, the host's convention. Bodies are read as plain JSON and answers are plain
dicts (no pydantic models: A1111 has pydantic 1, Forge 2). Errors are returned, not raised, so a
host's exception middleware (A1111's --api) cannot reshape them.
"""
from __future__ import annotations

import json
import math
import secrets
from typing import TYPE_CHECKING, Any, Callable, Mapping

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.concurrency import run_in_threadpool

from ..config.schema import IGNORED_KEYS, SECOND_PASS_KEY, TrainConfig
from ..fsutil import inside
from ..config.params import ConfigError, export
from ..paths import logs_dir
from ..training.plot import log_names, resolve_log

if TYPE_CHECKING:  # the controller imports the engine (torch); the API only calls it
    from ..ui.controller import Controller

PREFIX = "/traindeck/v1"
ROUTE_TAG = "traindeck"  # route names start with it, so mount() can replace its own routes
MOUNTED = "traindeck_routes"  # the app.state attribute listing the routes mount() added
PROGRESS_FIELDS = ("phase", "mode", "name", "step", "total", "loss", "loss_ema", "it_per_s", "eta_s", "message")
JOB_KEYS = frozenset({"preset", "settings", "overrides", "start"})
# What /docs shows for the two bodies, which are read by hand rather than by a pydantic model.
_OBJECT = {"type": "object", "additionalProperties": True}
BODIES = {(method, path): {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": props}}}}} for method, path, props in (
    ("POST", "/jobs", {"preset": {"type": "string"}, "settings": _OBJECT, "overrides": _OBJECT,
                       "start": {"type": "boolean", "default": False}}),
    ("POST", "/jobs/{job_id}/move", {"offset": {"type": "integer", "example": -1}}))}


def parse_api_auth(text: str | None) -> dict[str, str] | None:
    """{user: password} from the host's `--api-auth "u:p,u2:p2"`; None (open) when empty.

    Entries are comma-separated and stripped; the password is everything after the first ':'.
    A malformed entry raises ValueError instead of being skipped: a typo must not open the API.
    """
    if not text or not text.strip():
        return None
    credentials: dict[str, str] = {}
    for number, entry in enumerate(text.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user:  # the entry itself is not shown: it may well be a password
            raise ValueError(f"--api-auth entry {number} is not user:password")
        credentials[user] = password
    return credentials or None


def basic_auth(credentials: Mapping[str, str]) -> Callable[..., str]:
    """A dependency that accepts only these users (401 with WWW-Authenticate: Basic otherwise)."""
    expected = [(user.encode("utf-8"), password.encode("utf-8")) for user, password in credentials.items()]
    security = HTTPBasic()  # a missing or malformed header is already a 401 there

    def check(given: HTTPBasicCredentials = Depends(security)) -> str:
        user, password = given.username.encode("utf-8"), given.password.encode("utf-8")
        ok = False
        for want_user, want_password in expected:
            # Both compared for every entry, combined with `&`: the time taken says neither
            # which user exists nor which half was wrong.
            ok |= secrets.compare_digest(user, want_user) & secrets.compare_digest(password, want_password)
        if not ok:
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return given.username

    return check


def json_safe(value: Any) -> Any:
    """`value` itself when JSON can carry it, else its repr (a ConfigError may hold anything)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def error(exc: ConfigError, status: int = 422) -> JSONResponse:
    """The API's error shape: which field, what value, and the message."""
    detail = {"field": exc.key, "value": json_safe(exc.value), "message": str(exc)}
    return JSONResponse({"detail": detail}, status_code=status)


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value  # NaN isn't JSON


def check_known(settings: Mapping[str, Any]) -> None:
    """Refuse keys the schema does not know: presets only warn, but an API caller wants to know."""
    for key, value in settings.items():
        if key == SECOND_PASS_KEY:
            if isinstance(value, Mapping):
                check_known({k: v for k, v in value.items() if k != SECOND_PASS_KEY})
            continue
        if key in IGNORED_KEYS:
            continue
        try:
            TrainConfig.param_for(key)
        except KeyError:
            raise ConfigError(key, value, "unknown setting; GET /schema lists the keys") from None


def schema() -> list[dict[str, Any]]:
    """Every setting with its preset key, kind, limits and default (as a preset stores it)."""
    defaults = TrainConfig()
    return [{"key": p.key, "name": name, "kind": p.kind, "label": p.label, "help": p.help,
             "choices": list(p.choices), "modes": list(p.modes), "section": p.section, "group": p.group,
             "families": list(p.families),
             "minimum": p.minimum, "maximum": p.maximum, "default": export(p, getattr(defaults, name))}
            for name, p in TrainConfig.params()]


async def _body(request: Request, field: str) -> dict[str, Any]:
    """The request body as a JSON object; ConfigError naming `field` when it is not one."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ConfigError(field, raw[:80].decode("utf-8", "replace"), "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(field, data, "the body must be a JSON object")
    return data


class Routes:
    """The handlers, bound to one Controller. Work runs in the thread pool, off the event loop."""

    def __init__(self, ctl: Controller):
        self.ctl = ctl

    def presets(self) -> list[str]:
        return self.ctl.presets()

    def jobs(self) -> list[dict[str, Any]]:
        return self.ctl.queue.snapshot()

    def job(self, job_id: str) -> Any:
        return self._for_job(job_id, lambda: {**self._row(job_id), "settings": self.ctl.queue.get(job_id).settings})

    def status(self) -> dict[str, Any]:
        """The status line plus the running job's numbers (progress is null when idle)."""
        queue = self.ctl.queue
        p = queue.current()
        rows = queue.snapshot()
        running = next((r["id"] for r in rows if r["state"] == "running"), None)
        progress = None
        if p is not None:
            progress = {"id": running, **{f: _finite(getattr(p, f)) for f in PROGRESS_FIELDS}}
        return {"text": self.ctl.status(), "running": queue.running,
                "queued": sum(1 for r in rows if r["state"] == "queued"), "progress": progress}

    def logs(self) -> list[str]:
        root = logs_dir()
        # A link that points out of logs/ is not listed either, not only refused when fetched.
        return [name for name in log_names(root) if inside(root, root / name)]

    def log(self, name: str) -> Response:
        """One CSV log; every refusal (outside logs/, not .csv, missing) is a 404 naming `log`."""
        try:
            path = resolve_log(name, logs_dir())
            # Read whole, not streamed: a running job's log grows, and a FileResponse would then
            # send more bytes than the Content-Length it declared.
            data = path.read_bytes()
        except ConfigError as exc:
            return error(exc, 404)
        except OSError as exc:  # removed or unreadable since resolve_log looked
            return error(ConfigError("log", name, f"cannot be read: {exc.strerror or exc}"), 404)
        return Response(data, media_type="text/csv")

    async def enqueue(self, request: Request) -> JSONResponse:
        try:
            data = await _body(request, "body")
        except ConfigError as exc:
            return error(exc)
        return await run_in_threadpool(self._enqueue, data)

    def _enqueue(self, data: dict[str, Any]) -> JSONResponse:
        try:
            start = data.get("start", False)
            if not isinstance(start, bool):
                raise ConfigError("start", start, "expected true or false")
            cfg, warnings = self._config(data)
            job = self.ctl.queue.add(self.ctl.admit(cfg))
            if start:
                self.ctl.queue.start()
        except ConfigError as exc:
            return error(exc)
        return JSONResponse({**self._row(job.id), "warnings": warnings}, status_code=201)

    def _config(self, data: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
        """The job's config from {"preset"} or {"settings"}, then "overrides", then the fallbacks."""
        for key, value in data.items():
            if key not in JOB_KEYS:
                raise ConfigError(key, value, f"unknown field; expected {', '.join(sorted(JOB_KEYS))}")
        if ("preset" in data) == ("settings" in data):
            raise ConfigError("preset", data.get("preset"), "give a preset name or settings (not both)")
        warnings: list[str] = []
        if "preset" in data:
            name = data["preset"]
            # Only names from the list: a path would let a caller read any .json on the machine.
            if not isinstance(name, str) or name not in self.ctl.presets():
                raise ConfigError("preset", name, "no such preset; GET /presets lists them")
            try:
                cfg, warnings = self.ctl.load_preset(name)
            except ConfigError as exc:  # its value is the file's path; the caller gave a name
                raise (ConfigError("preset", name, exc.problem) if exc.key == "preset" else exc) from None
        else:
            settings = data["settings"]
            if not isinstance(settings, dict):
                raise ConfigError("settings", settings, "expected a JSON object of settings")
            check_known(settings)
            cfg = TrainConfig.from_dict(settings)
        overrides = data.get("overrides", {})
        if not isinstance(overrides, dict):
            raise ConfigError("overrides", overrides, "expected a JSON object of settings")
        check_known(overrides)
        cfg = cfg.with_overrides(overrides)
        # As the form does: empty fields take the app's fallbacks (the standalone demo's model).
        empty = {name: value for name, value in self.ctl.fallbacks.items() if not str(getattr(cfg, name, "")).strip()}
        return (cfg.with_overrides(empty) if empty else cfg), warnings

    def remove(self, job_id: str) -> Any:
        def work() -> dict[str, str]:
            self.ctl.queue.remove(job_id)
            return {"removed": job_id}
        return self._for_job(job_id, work)

    async def move(self, job_id: str, request: Request) -> Any:
        try:
            offset = (await _body(request, "offset")).get("offset")
            if isinstance(offset, bool) or not isinstance(offset, int):
                raise ConfigError("offset", offset, "expected a whole number of rows (-1 = up, 1 = down)")
        except ConfigError as exc:
            return error(exc)
        return await run_in_threadpool(
            self._for_job, job_id, lambda: {"id": job_id, "index": self.ctl.queue.move(job_id, offset)})

    def start(self) -> dict[str, Any]:
        return {"running": self.ctl.queue.start(), "text": self.ctl.status()}

    def stop(self) -> dict[str, Any]:
        return self._stop(save=False)

    def stop_and_save(self) -> dict[str, Any]:
        return self._stop(save=True)

    def _stop(self, save: bool) -> dict[str, Any]:
        """Stop the running job and pause the queue until /start; `stopping`: whether one was asked."""
        return {"stopping": self.ctl.queue.stop(save), "save": save, "text": self.ctl.status()}

    def _row(self, job_id: str) -> dict[str, Any]:
        return next((r for r in self.ctl.queue.snapshot() if r["id"] == job_id), {"id": job_id})

    def _for_job(self, job_id: str, work: Callable[[], Any]) -> Any:
        """`work()`, or its error: the queue says "job" both for an unknown id (404) and for a
        refused change such as removing the running job (409)."""
        try:
            return work()
        except ConfigError as exc:
            if exc.key != "job":
                return error(exc)
            known = any(r["id"] == job_id for r in self.ctl.queue.snapshot())
            return error(exc, 409 if known else 404)


def create_router(ctl: Controller, credentials: Mapping[str, str] | None = None, prefix: str = PREFIX) -> APIRouter:
    """Every route under `prefix`; with `credentials` each one needs HTTP Basic auth."""
    deps = [Depends(basic_auth(credentials))] if credentials else []
    router = APIRouter(prefix=prefix, tags=[ROUTE_TAG], dependencies=deps)
    r = Routes(ctl)
    table: list[tuple[str, str, Callable[..., Any], int]] = [
        ("GET", "/presets", r.presets, 200),
        ("GET", "/schema", schema, 200),
        ("GET", "/jobs", r.jobs, 200),
        ("POST", "/jobs", r.enqueue, 201),
        ("GET", "/jobs/{job_id}", r.job, 200),
        ("DELETE", "/jobs/{job_id}", r.remove, 200),
        ("POST", "/jobs/{job_id}/move", r.move, 200),
        ("POST", "/start", r.start, 200),
        ("POST", "/stop", r.stop, 200),
        ("POST", "/stop-and-save", r.stop_and_save, 200),
        ("GET", "/status", r.status, 200),
        ("GET", "/logs", r.logs, 200),
        ("GET", "/logs/{name:path}", r.log, 200),
    ]
    for method, path, endpoint, status in table:
        # response_model=None: answers are plain dicts; no pydantic model inferred from the hints.
        router.add_api_route(path, endpoint, methods=[method], status_code=status, response_model=None,
                             name=f"{ROUTE_TAG}:{method.lower()}:{path}", openapi_extra=BODIES.get((method, path)))
    return router


def mount(app: FastAPI, ctl: Controller, credentials: Mapping[str, str] | None = None,
          prefix: str = PREFIX) -> APIRouter:
    """Add the routes to the host's app, replacing ones an earlier call added: the host calls
    `on_app_started` again after each UI reload, and the first routes (and Controller) would win.

    What an earlier call added is kept on the app (FastAPI from 0.137 adds one unnamed entry per
    included router, earlier versions one named route per endpoint); named routes of ours from an
    app that predates that record go too."""
    earlier = {id(route) for route in getattr(app.state, MOUNTED, ())}
    app.router.routes[:] = [route for route in app.router.routes if id(route) not in earlier
                            and not str(getattr(route, "name", "")).startswith(f"{ROUTE_TAG}:")]
    present = {id(route) for route in app.router.routes}
    router = create_router(ctl, credentials, prefix)
    app.include_router(router)
    setattr(app.state, MOUNTED, [route for route in app.router.routes if id(route) not in present])
    app.openapi_schema = None  # rebuilt with the new routes on the next /openapi.json
    return router


__all__ = ["PREFIX", "basic_auth", "create_router", "error", "mount", "parse_api_auth", "schema"]
