"""scripts/traindeck.py inside a (stand-in) WebUI: our own package under its alias, the tab,
the routes, and a clash with another extension's `trainer` reported."""
from __future__ import annotations

import logging
import runpy
import shutil
import sys
import types

import pytest

from trainer.paths import ROOT

from tests.tiny import tiny_bundle
from tests.webuikit import a1111_model, endpoints, fake_webui

pytestmark = pytest.mark.ui
ALIAS = "traindeck_trainer"


@pytest.fixture()
def entry(tmp_path, monkeypatch):
    from trainer.paths import cache_dir

    shutil.copytree(cache_dir() / "clip", tmp_path / "cache" / "clip")  # the queue journal goes to tmp too
    monkeypatch.setenv("TRAINDECK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path / "logs"))
    saved = {k: v for k, v in sys.modules.items() if k == ALIAS or k.startswith(ALIAS + ".")}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [k for k in sys.modules if k == ALIAS or k.startswith(ALIAS + ".")]:
        tab = sys.modules[name]
        if name.endswith(".hosts.tab"):
            for ctl in tab._CONTROLLER:
                ctl.close()
        del sys.modules[name]


def test_the_entry_loads_its_own_package_registers_and_reports_a_clash(entry, tmp_path, monkeypatch, caplog):
    other = types.ModuleType("trainer")
    other.__file__ = str(tmp_path / "other-extension" / "trainer" / "__init__.py")
    monkeypatch.setitem(sys.modules, "trainer", other)  # another extension's `trainer` got there first
    with fake_webui("a1111") as w, caplog.at_level(logging.INFO):
        w.shared.sd_model = a1111_model(tiny_bundle("sd1"), tmp_path / "m.safetensors")
        runpy.run_path(str(ROOT / "scripts" / "traindeck.py"), run_name="traindeck_entry")
        ours = sys.modules[ALIAS]
        assert ours.__file__ == str(ROOT / "trainer" / "__init__.py") and sys.modules["trainer"] is other
        assert any("another extension's 'trainer' package" in r.getMessage() for r in caplog.records)
        assert len(w.script_callbacks.ui_tabs_callbacks) == 1 and len(w.script_callbacks.app_started_callbacks) == 1
        (blocks, title, elem_id), = w.script_callbacks.ui_tabs_callbacks[0]()
        assert (title, elem_id) == ("Traindeck", "traindeck")
        assert type(blocks).__name__ == "Blocks"
        host = sys.modules[f"{ALIAS}.hosts.tab"].controller().host
        assert host.list_models() == ["m.safetensors [0123456789]"] and host.kind == "a1111"


def test_an_unsupported_host_is_named_in_the_tab(entry, tmp_path):
    with fake_webui("a1111") as w:
        import modules.launch_utils as launch

        launch.tag = "v1.6.0"
        runpy.run_path(str(ROOT / "scripts" / "traindeck.py"), run_name="traindeck_entry")
        (blocks, _, _), = w.script_callbacks.ui_tabs_callbacks[0]()
        notice = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "traindeck-notice"]
        assert notice and "v1.6.0" in notice[0].value and "not one Traindeck was tested on" in notice[0].value


def test_the_routes_are_mounted_once_and_protected_by_api_auth(entry, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    with fake_webui("a1111") as w:
        w.shared.cmd_opts.api_auth = "user:pass"
        runpy.run_path(str(ROOT / "scripts" / "traindeck.py"), run_name="traindeck_entry")
        app = FastAPI()
        started = w.script_callbacks.app_started_callbacks[0]
        started(None, app)
        started(None, app)  # the WebUI calls it again after a UI reload
        client = TestClient(app)
        assert client.get("/traindeck/v1/status").status_code == 401
        assert client.get("/traindeck/v1/status", auth=("user", "pass")).status_code == 200
        assert sum(1 for r in endpoints(app.routes) if getattr(r, "path", "") == "/traindeck/v1/status") == 1
