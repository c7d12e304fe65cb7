"""The REST API (trainer/jobs/api.py) on a FastAPI app of its own, over a Controller on the demo model."""
from __future__ import annotations

import base64
import time
import uuid

import pytest

from trainer.config.schema import TrainConfig
from trainer.training.events import Progress
from trainer.paths import logs_dir
from trainer.config.presets import load_preset
from trainer.training.runlog import CsvLog

# The profile without a WebUI has neither fastapi nor gradio: conftest.py leaves this file out there.
from fastapi import FastAPI
from fastapi.testclient import TestClient

from trainer.jobs.api import PREFIX, PROGRESS_FIELDS, mount, parse_api_auth, schema

from tests.uikit import app, demo_root, make_app, wait_idle  # noqa: F401 (fixtures)
from tests.webuikit import endpoints

pytestmark = pytest.mark.ui

QUICK = {"train_iterations": 2, "save_lora_name": "api", "image_size(height, width)": 64, "image_min_length": 64}
USERS = {"alice": "s3cret:with:colons", "bob": "hunter2"}



@pytest.fixture(autouse=True, scope="module")
def demo_images(demo_root):
    """Jobs name the demo's images explicitly: an empty image folder is refused."""
    from trainer.demo import ensure_demo

    QUICK["lora_data_directory"] = str(ensure_demo(demo_root)[1])
    yield
    del QUICK["lora_data_directory"]


def client_for(app, credentials=None) -> TestClient:
    api = FastAPI()
    mount(api, app.ctl, credentials)
    return TestClient(api)


@pytest.fixture()
def client(app):
    return client_for(app)


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory, demo_root):
    """One app for the many tests that only need an empty queue (a gradio 4 app takes ~0.3 s)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        built = make_app(tmp_path_factory.mktemp("auth"), monkeypatch, demo_root)
        write_log(logs_dir(), "20260101", "a")
        yield built
        built.ctl.close()


@pytest.fixture()
def shared(shared_app):
    """The shared app with an empty, paused queue again after each test."""
    yield shared_app
    queue = shared_app.ctl.queue
    queue.stop()
    assert queue.wait(60)
    queue.clear()


@pytest.fixture()
def shared_client(shared):
    return client_for(shared)


def url(path: str) -> str:
    return PREFIX + path


def settings(name: str, **changes) -> dict:
    """Preset-shaped settings of a quick demo job on the demo's images (the app's fallback fills the model)."""
    return load_preset("LoRA_Demo").with_overrides({**QUICK, "save_lora_name": name, **changes}).to_dict()


def enqueue(client, name: str, **body) -> dict:
    response = client.post(url("/jobs"), json={"settings": settings(name), **body})
    assert response.status_code == 201, response.text
    return response.json()


def poll_idle(client, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = client.get(url("/status")).json()
        if not status["running"]:
            return status
        time.sleep(0.05)
    raise TimeoutError(status)


def write_log(root, day: str, name: str):
    with CsvLog(root / day / f"{name}.csv", {"save_lora_name": name, "network_rank": 4}, 1) as log:
        for step in (1, 2, 3):
            log.row(step, 1.0 / step, [1e-4], 1.5 / step)
    return root / day / f"{name}.csv"


# ---- reading ------------------------------------------------------------------------
def test_presets_and_schema(client, app):
    presets = client.get(url("/presets")).json()
    assert presets == app.ctl.presets() and "LoRA_Demo" in presets
    rows = client.get(url("/schema")).json()
    assert [r["key"] for r in rows] == [p.key for _, p in TrainConfig.params()]
    size = next(r for r in rows if r["name"] == "image_size")
    assert size == {"key": "image_size(height, width)", "name": "image_size", "kind": "size",
                    "label": "Image size (height, width)", "help": size["help"], "choices": [],
                    "modes": ["LoRA", "iLECO", "Multi-ADDifT"], "section": "required", "group": "",
                    "families": [], "minimum": 16, "maximum": 8192, "default": "512"}
    optimizer = next(r for r in rows if r["key"] == "train_optimizer")
    assert "AdamW" in optimizer["choices"] and optimizer["default"] == "AdamW"
    assert next(r for r in rows if r["key"] == "train_textencoder_learning_rate")["default"] == ""
    family = {r["key"]: r for r in rows if r["families"]}
    assert set(family) >= {"clip_l", "t5xxl", "ae", "guidance_scale", "timestep_sampling", "model_prediction_type",
                           "clip_g", "training_shift"}
    assert all(r["families"] == FAMILIES_OF.get(k, ["flux"]) and r["group"] == "flow" for k, r in family.items())


# The flow options other families share with FLUX, and their own; every other family field is FLUX's only.
SHARED_FIELDS = {"clip_l", "t5xxl", "ae", "t5xxl_max_token_length", "apply_t5_attn_mask"}  # FLUX and SD3
ZIMAGE_SHARED = {"timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type"}
ALL_FLOW_FIELDS = {"weighting_scheme", "logit_mean", "logit_std", "mode_scale"}
SD3_ONLY_FIELDS = {"clip_g", "training_shift"}
ZIMAGE_ONLY_FIELDS = {"qwen3", "qwen3_max_token_length"}
FAMILIES_OF = {**{k: ["flux", "sd3"] for k in SHARED_FIELDS}, **{k: ["flux", "zimage"] for k in ZIMAGE_SHARED},
               **{k: ["flux", "sd3", "zimage"] for k in ALL_FLOW_FIELDS}, **{k: ["sd3"] for k in SD3_ONLY_FIELDS},
               **{k: ["zimage"] for k in ZIMAGE_ONLY_FIELDS}}
FLUX_ONLY_FIELDS = {"guidance_scale", "blocks_to_swap", "fp8_base",
                    "train_double_block_indices", "train_single_block_indices", "img_attn_dim", "single_mod_dim",
                    "split_qkv", "train_t5xxl", "t5xxl_learning_rate"}


def test_the_api_schema_lists_the_flux_fields_with_their_family():
    rows = {r["name"]: r for r in schema()}
    flagged = {n for n, r in rows.items() if r["families"]}
    assert flagged == {n for n, p in TrainConfig.params() if p.families}
    assert FLUX_ONLY_FIELDS | set(FAMILIES_OF) <= flagged
    for name in flagged:
        assert rows[name]["families"] == FAMILIES_OF.get(name, ["flux"]) and rows[name]["group"] == "flow", name
    assert rows["network_rank"]["families"] == [] and rows["train_snr_gamma"]["families"] == []
    assert rows["discrete_flow_shift"]["default"] == 3.1582 and rows["guidance_scale"]["default"] == 1.0


# ---- enqueue and train ----------------------------------------------------------------------
def test_a_preset_with_overrides_trains_to_done_and_logs_it(client, tmp_path):
    response = client.post(url("/jobs"), json={"preset": "LoRA_Demo", "overrides": QUICK, "start": True})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["name"] == "api" and job["mode"] == "LoRA" and job["state"] in ("queued", "running")
    assert job["warnings"] == []
    status = poll_idle(client)
    assert status["progress"] is None and "api done" in status["text"]
    (row,) = client.get(url("/jobs")).json()
    assert row["id"] == job["id"] and row["state"] == "done" and row["steps"] == 2
    assert (tmp_path / "out" / "api.safetensors").is_file()
    (name,) = client.get(url("/logs")).json()
    assert name.endswith(".csv") and "/api-" in name
    csv = client.get(url(f"/logs/{name}"))
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[0].startswith("network_rank,") and "Step,Loss" in csv.text


def test_settings_are_queued_without_starting(client, app):
    job = enqueue(client, "waits")
    assert job["state"] == "queued" and not app.ctl.queue.running
    one = client.get(url(f"/jobs/{job['id']}")).json()
    assert one["id"] == job["id"] and one["settings"]["save_lora_name"] == "waits"
    assert one["settings"]["train_iterations"] == 2


def test_overrides_apply_over_settings(client):
    job = enqueue(client, "base", overrides={"save_lora_name": "renamed", "train_batch_size": "1"})
    settings_back = client.get(url(f"/jobs/{job['id']}")).json()["settings"]
    assert job["name"] == "renamed" and settings_back["train_batch_size"] == 1


def test_list_delete_and_move(client):
    ids = [enqueue(client, name)["id"] for name in ("one", "two", "three")]
    assert [r["id"] for r in client.get(url("/jobs")).json()] == ids
    moved = client.post(url(f"/jobs/{ids[2]}/move"), json={"offset": -1})
    assert moved.status_code == 200 and moved.json() == {"id": ids[2], "index": 1}
    assert [r["name"] for r in client.get(url("/jobs")).json()] == ["one", "three", "two"]
    assert client.post(url(f"/jobs/{ids[0]}/move"), json={"offset": 99}).json()["index"] == 2  # clamped
    gone = client.delete(url(f"/jobs/{ids[1]}"))
    assert gone.status_code == 200 and gone.json() == {"removed": ids[1]}
    assert [r["name"] for r in client.get(url("/jobs")).json()] == ["three", "one"]
    again = client.delete(url(f"/jobs/{ids[1]}"))
    assert again.status_code == 404 and again.json()["detail"]["field"] == "job"


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/jobs/nope", None), ("DELETE", "/jobs/nope", None), ("POST", "/jobs/nope/move", {"offset": 1})])
def test_an_unknown_job_is_404(shared_client, method, path, body):
    client = shared_client
    enqueue(client, "exists")
    response = client.request(method, url(path), json=body)
    detail = response.json()["detail"]
    assert response.status_code == 404 and detail["field"] == "job" and detail["value"] == "nope"
    assert "not in the queue" in detail["message"]


@pytest.mark.parametrize("save", [False, True])
def test_stop_and_stop_and_save_end_a_long_job(client, tmp_path, save):
    job = enqueue(client, "long", overrides={"train_iterations": 100000}, start=True)
    end = time.monotonic() + 60
    progress = None
    while time.monotonic() < end:
        progress = client.get(url("/status")).json()["progress"]
        if progress and progress["step"] >= 2:
            break
        time.sleep(0.05)
    assert set(progress) == {"id", *PROGRESS_FIELDS}
    assert progress["id"] == job["id"] and progress["name"] == "long" and progress["total"] == 100000
    assert progress["phase"] == "training" and progress["mode"] == "LoRA" and progress["loss"] is not None
    busy = client.delete(url(f"/jobs/{job['id']}"))
    assert busy.status_code == 409 and busy.json()["detail"]["field"] == "job"  # running: not removed
    stopped = client.post(url("/stop-and-save" if save else "/stop"))
    assert stopped.status_code == 200 and stopped.json()["stopping"] is True and stopped.json()["save"] is save
    status = poll_idle(client)
    assert "long stopped" in status["text"]
    assert client.get(url("/jobs")).json()[0]["state"] == "stopped"
    assert (tmp_path / "out" / "long.safetensors").is_file() == save
    assert client.post(url("/stop")).json()["stopping"] is False


def test_status_never_sends_nan(shared_client, shared, monkeypatch):
    p = Progress(phase="training", mode="LoRA", name="x", step=3, total=9, loss=float("nan"), loss_ema=float("inf"))
    monkeypatch.setattr(shared.ctl.queue, "current", lambda: p)
    response = shared_client.get(url("/status"))
    assert response.status_code == 200
    progress = response.json()["progress"]
    assert progress["loss"] is None and progress["loss_ema"] is None and progress["step"] == 3


def test_start_runs_what_is_queued(client, app, tmp_path):
    assert client.post(url("/start")).json()["running"] is False  # nothing queued
    enqueue(client, "later")
    assert client.post(url("/start")).json()["running"] is True
    assert "later done" in poll_idle(client)["text"] and (tmp_path / "out" / "later.safetensors").is_file()


# ---- refusals ----------------------------------------------------------------------------------
BAD_BODIES = [
    ({"preset": "LoRA_Demo", "overrides": {"train_batch_size": "abc"}}, "train_batch_size", "abc"),
    ({"settings": {"save_lora_name": "x", "train_batch_size": "abc"}}, "train_batch_size", "abc"),
    ({"preset": "LoRA_Demo", "overrides": {"no_such_setting": 1}}, "no_such_setting", 1),
    ({"settings": {"save_lora_name": "x", "bogus": True}}, "bogus", True),
    ({"settings": {"save_lora_name": "x", "2nd pass": {"nested_bogus": 1}}}, "nested_bogus", 1),
    ({"preset": "LoRA_Demo", "overrides": {"save_lora_name": "a/b"}}, "save_lora_name", "a/b"),
    ({"preset": "missing"}, "preset", "missing"),
    ({"preset": "../presets/LoRA"}, "preset", "../presets/LoRA"),
    ({"preset": 3}, "preset", 3),
    ({}, "preset", None),
    ({"preset": "LoRA_Demo", "settings": {}}, "preset", "LoRA_Demo"),
    ({"settings": []}, "settings", []),
    ({"preset": "LoRA_Demo", "overrides": ["x"]}, "overrides", ["x"]),
    ({"preset": "LoRA_Demo", "start": "yes"}, "start", "yes"),
    ({"preset": "LoRA_Demo", "overide": {}}, "overide", {}),
    (["preset"], "body", ["preset"]),
]


@pytest.mark.parametrize("body, field, value", BAD_BODIES)
def test_a_bad_body_is_422_naming_the_field(shared_client, shared, body, field, value):
    client, app = shared_client, shared
    response = client.post(url("/jobs"), json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == field and detail["value"] == value and field in detail["message"]
    assert app.ctl.queue.snapshot() == []


def test_a_preset_given_as_a_path_is_refused(client, app, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text('{"save_lora_name": "stolen"}', encoding="utf-8")
    response = client.post(url("/jobs"), json={"preset": str(outside)})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "preset"
    assert app.ctl.queue.snapshot() == []


def test_a_broken_preset_is_422_naming_it_not_its_path(client, tmp_path):
    (tmp_path / "presets" / "Broken.json").write_text("{not json", encoding="utf-8")
    response = client.post(url("/jobs"), json={"preset": "Broken"})
    detail = response.json()["detail"]
    assert response.status_code == 422 and detail["field"] == "preset" and detail["value"] == "Broken"
    assert str(tmp_path) not in response.text and "not valid JSON" in detail["message"]


@pytest.mark.parametrize("raw", [b"not json", b"", b"\xff\xfe"])
def test_a_body_that_is_not_json_is_422(shared_client, raw):
    client = shared_client
    response = client.post(url("/jobs"), content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "body"


def test_a_duplicate_name_is_refused(client):
    enqueue(client, "twice")
    response = client.post(url("/jobs"), json={"settings": settings("TWICE")})  # case-insensitive
    assert response.status_code == 422
    assert response.json()["detail"]["field"] == "save_lora_name" and response.json()["detail"]["value"] == "TWICE"
    assert len(client.get(url("/jobs")).json()) == 1


def test_a_job_that_would_fail_later_is_refused_when_added(client, app, tmp_path):
    """The checks the Train tab runs: the API names the preset key, and nothing is queued."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "taken.safetensors").write_bytes(b"x")
    cases = [
        ({"lora_data_directory": ""}, "lora_data_directory", "no image folder given"),
        ({"lora_data_directory": str(tmp_path / "nope")}, "lora_data_directory", "folder does not exist"),
        ({"lora_data_directory": str(tmp_path / "empty")}, "lora_data_directory", "folder has no images"),
        ({"save_lora_name": "taken"}, "save_lora_name", "taken.safetensors already exists"),
    ]
    for overrides, field, problem in cases:
        response = client.post(url("/jobs"), json={"preset": "LoRA_Demo", "overrides": {**QUICK, **overrides}})
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert detail["field"] == field and detail["message"].startswith(f"{field}: ") and problem in detail["message"]
    assert client.get(url("/jobs")).json() == []


@pytest.mark.parametrize("body", [{"offset": "up"}, {"offset": True}, {"offset": 1.5}, {}, ["offset"], None])
def test_a_bad_move_is_422_naming_offset(shared_client, body):
    client = shared_client
    job = enqueue(client, "stay")
    response = client.post(url(f"/jobs/{job['id']}/move"), json=body)
    assert response.status_code == 422 and response.json()["detail"]["field"] == "offset"


# ---- logs ----------------------------------------------------------------------------------------
SECRET = "Step,Loss\n1,leaked-bytes\n"


@pytest.fixture()
def logs_with_a_link_out(tmp_path):
    """logs/20260101/a.csv, a secret.csv beside logs/, and logs/20260101/link.csv pointing at it."""
    logs = tmp_path / "logs"
    write_log(logs, "20260101", "a")
    (logs / "20260101" / "notes.txt").write_text(SECRET)
    secret = tmp_path / "secret.csv"
    secret.write_text(SECRET)
    (logs / "20260101" / "link.csv").symlink_to(secret)
    return secret


def test_logs_are_listed_and_served_as_csv(client, logs_with_a_link_out):
    assert client.get(url("/logs")).json() == ["20260101/a.csv"]  # the link out is not listed
    response = client.get(url("/logs/20260101/a.csv"))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    lines = response.text.splitlines()
    assert lines[:3] == ["save_lora_name,a", "network_rank,4", "Step,Loss,Learning Rate 1,Raw Loss"]


@pytest.mark.parametrize("name", [
    "%2e%2e/secret.csv", "%2E%2E%2Fsecret.csv", "20260101/%2e%2e/%2e%2e/secret.csv", "..%5Csecret.csv",
    "20260101/link.csv", "20260101/notes.txt", "20260101/none.csv", "/OUTSIDE", "%2FOUTSIDE", "C:%5COUTSIDE"])
def test_log_names_outside_logs_are_refused(client, logs_with_a_link_out, name):
    # "/OUTSIDE" asks for .../logs//tmp/.../secret.csv: the route gets an absolute name.
    name = name.replace("OUTSIDE", str(logs_with_a_link_out).lstrip("/"))
    response = client.get(url(f"/logs/{name}"))
    assert response.status_code == 404 and "leaked-bytes" not in response.text
    assert response.json()["detail"]["field"] == "log"  # refused by the API, not a routing miss


def test_encoded_traversal_reaches_the_handler_decoded_and_is_refused(client, logs_with_a_link_out):
    detail = client.get(url("/logs/%2e%2e/secret.csv")).json()["detail"]
    assert detail["field"] == "log" and detail["value"] == "../secret.csv"
    # A literal ../ is resolved by the client before sending (curl too, without --path-as-is).
    literal = client.get(url("/logs/../secret.csv"))
    assert literal.status_code == 404 and "leaked-bytes" not in literal.text


# ---- auth ------------------------------------------------------------------------------------------
ROUTES = [
    ("GET", "/presets", None, 200), ("GET", "/schema", None, 200), ("GET", "/jobs", None, 200),
    ("POST", "/jobs", "NEW", 201), ("GET", "/jobs/{job}", None, 200), ("DELETE", "/jobs/{job}", None, 200),
    ("POST", "/jobs/{job}/move", {"offset": 0}, 200), ("POST", "/start", None, 200), ("POST", "/stop", None, 200),
    ("POST", "/stop-and-save", None, 200), ("GET", "/status", None, 200), ("GET", "/logs", None, 200),
    ("GET", "/logs/20260101/a.csv", None, 200),
]
ROUTE_IDS = [f"{m} {p}" for m, p, _, _ in ROUTES]


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def call(app, client, route, headers):
    """Make the request of `route`, on a queue with one waiting job and a log to fetch."""
    method, path, body, _ = route
    job = app.ctl.queue.add(TrainConfig.from_dict(settings(f"held-{uuid.uuid4().hex[:8]}")))
    body = {"settings": settings(f"new-{uuid.uuid4().hex[:8]}")} if body == "NEW" else body
    return client.request(method, url(path.format(job=job.id)), json=body, headers=headers)


@pytest.mark.parametrize("headers", [
    {}, basic("mallory", "hunter2"), basic("alice", "wrong"), basic("alice", "hunter2"), basic("bob", ""),
    {"Authorization": "Basic !!!notbase64"}, {"Authorization": "Bearer hunter2"}],
    ids=["none", "wrong-user", "wrong-password", "other-users-password", "empty-password", "garbled", "bearer"])
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_with_credentials_a_bad_login_is_401_on_every_route(shared, route, headers):
    response = call(shared, client_for(shared, USERS), route, headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Basic"
    (row,) = shared.ctl.queue.snapshot()  # nothing was changed: the job is still there, queued
    assert row["name"].startswith("held-") and row["state"] == "queued" and not shared.ctl.queue.running


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("user", sorted(USERS))
def test_with_credentials_the_right_login_is_let_in(shared, route, user):
    response = call(shared, client_for(shared, USERS), route, basic(user, USERS[user]))
    assert response.status_code == route[3], response.text


def test_an_unauthenticated_bad_body_is_401_not_422(app):
    client = client_for(app, USERS)
    response = client.post(url("/jobs"), content=b"not json", headers={"content-type": "application/json"})
    assert response.status_code == 401


@pytest.mark.parametrize("auth", [None, "", "  "])
def test_without_credentials_the_api_is_open(app, auth):
    client = client_for(app, parse_api_auth(auth))
    assert client.get(url("/presets")).status_code == 200
    assert client.post(url("/jobs"), json={"settings": settings("open")}).status_code == 201


@pytest.mark.parametrize("text, expected", [
    (None, None), ("", None), ("   ", None), (",", None),
    ("u:p", {"u": "p"}),
    ("u:p,u2:p2", {"u": "p", "u2": "p2"}),
    ("u:p:with:colons", {"u": "p:with:colons"}),
    (" u:p , v:q ,", {"u": "p", "v": "q"}),
    ("u:", {"u": ""}),
])
def test_parse_api_auth(text, expected):
    assert parse_api_auth(text) == expected


@pytest.mark.parametrize("text", ["nocolon", "u:p,broken", ":p"])
def test_parse_api_auth_refuses_a_malformed_entry(text):
    with pytest.raises(ValueError):
        parse_api_auth(text)


def test_mounting_again_replaces_the_routes(app, tmp_path, monkeypatch, demo_root):
    api = FastAPI()
    mount(api, app.ctl, USERS)
    other = make_app(tmp_path / "second", monkeypatch, demo_root)
    try:
        mount(api, other.ctl)  # e.g. after a UI reload: new controller, no credentials
        ours = [r for r in endpoints(api.routes) if str(getattr(r, "path", "")).startswith(PREFIX)]
        assert len(ours) == len(ROUTES)
        client = TestClient(api)
        assert client.post(url("/jobs"), json={"settings": settings("second")}).status_code == 201
        assert [r["name"] for r in other.ctl.queue.snapshot()] == ["second"] and app.ctl.queue.snapshot() == []
        assert "/traindeck/v1/status" in client.get("/openapi.json").json()["paths"]
    finally:
        wait_idle(other)
        other.ctl.close()


def test_100_concurrent_enqueues_lose_nothing_and_admit_no_duplicate(client, app):
    """8 threads, 100 POST /jobs for 50 names (each twice): 50 admitted, 50 refused with 422."""
    import random
    import threading

    names = [f"c{i:02d}" for i in range(50)] * 2
    random.Random(5).shuffle(names)
    bodies = {name: {"settings": settings(name)} for name in set(names)}
    codes: list[tuple[str, int]] = []
    barrier = threading.Barrier(8)

    def worker(part: list[str]) -> None:
        barrier.wait(30)
        for name in part:
            codes.append((name, client.post(url("/jobs"), json=bodies[name]).status_code))

    threads = [threading.Thread(target=worker, args=(names[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(codes) == 100
    assert sorted(n for n, c in codes if c == 201) == sorted(set(names))
    assert sorted(n for n, c in codes if c == 422) == sorted(set(names))
    listed = client.get(url("/jobs")).json()
    assert sorted(r["name"] for r in listed) == sorted(set(names)) and all(r["state"] == "queued" for r in listed)
