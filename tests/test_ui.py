"""The Gradio UI in the host's gradio (3.41 in the a1111 profile, 4.40 in forge), driven through
the Blocks' own handler functions."""
from __future__ import annotations

import json

import pytest

from trainer.config.schema import SECOND_PASS_FIELDS, TrainConfig
from trainer.ui import form
from trainer.ui.controller import Controller

from tests.familykit import header_file
from tests.modekit import write_pair
from tests.uikit import app, demo_root, handler, values, wait_idle  # noqa: F401 (fixtures)

pytestmark = pytest.mark.ui



def test_every_setting_has_a_widget_from_the_schema(app):
    assert set(app.train.fields) == set(form.FORM_FIELDS)
    assert set(app.train.second) == set(SECOND_PASS_FIELDS)
    for name in form.FORM_FIELDS:
        if name not in form.IMAGE_FIELDS and name != "mode":
            assert app.train.fields[name].label == form.PARAMS[name].label
    assert app.train.fields["network_blocks"].choices and app.train.fields["train_optimizer"].choices


FAMILY_DEFAULTS = [form.form_values(TrainConfig())[n] for n in form.FAMILY_FIELDS]
FLUX_FIELDS = {n for n in form.FAMILY_FIELDS if "flux" in form.PARAMS[n].families}  # shown for a FLUX model


def test_mode_switch_shows_what_the_schema_says(app):
    on_mode = handler(app.blocks, "traindeck_mode")
    names = [n for n in form.FORM_FIELDS if n not in form.HEADER_FIELDS]
    for mode in ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT"):
        ups = on_mode(mode, "", *FAMILY_DEFAULTS)
        shown = {n for n, u in zip(names, ups) if u["visible"]}
        assert shown == form.visible_fields(mode) - set(form.HEADER_FIELDS)
        rest = [u["visible"] for u in ups[len(names):]]
        prompts, images, original, target = rest[:4]
        groups, second = rest[4:-1], rest[-1]
        assert prompts == (mode in ("iLECO", "Difference", "ADDifT"))
        assert images == (mode in ("Difference", "ADDifT")) and second == (mode == "Difference")
        # the preview buttons only where their prompt is used: Difference has no target prompt
        assert original == (mode in ("iLECO", "Difference", "ADDifT")) and target == (mode in ("iLECO", "ADDifT"))
        assert groups == [bool(set(names_) & form.visible_fields(mode)) for names_ in form.GROUP_FIELDS.values()]
        assert groups[list(form.GROUP_FIELDS).index("pairs")] == (mode in ("Difference", "ADDifT", "Multi-ADDifT"))


def _flux_shown(ups: list) -> tuple[set[str], bool]:
    """(family fields shown, the flow group shown) from the view handler's updates."""
    names = [n for n in form.FORM_FIELDS if n not in form.HEADER_FIELDS]
    shown = {n for n, u in zip(names, ups) if u["visible"] and n in form.FAMILY_FIELDS}
    groups = ups[len(names) + 4:-1]
    return shown, groups[list(form.GROUP_FIELDS).index("flow")]["visible"]


def test_the_chosen_models_family_decides_the_flux_fields(app, tmp_path):
    more = tmp_path / "more-models"
    header_file(more / "flux1-dev.safetensors", "flux")
    header_file(more / "sd15.safetensors", "sd1")
    app.ctl.host.model_dirs.append(more)
    # The demo model (a diffusers folder that names no family) and a plain form: no FLUX fields.
    assert not any(app.train.fields[n].visible for n in form.FAMILY_FIELDS)
    assert app.train.groups["flow"].visible is False
    on_model = handler(app.blocks, "traindeck_model")
    for mode in ("LoRA", "iLECO", "ADDifT"):
        assert _flux_shown(on_model(mode, "flux1-dev.safetensors", *FAMILY_DEFAULTS)) == (FLUX_FIELDS, True)
        assert _flux_shown(on_model(mode, "sd15.safetensors", *FAMILY_DEFAULTS)) == (set(), False)
        assert _flux_shown(on_model(mode, "", *FAMILY_DEFAULTS)) == (set(), False)


def test_a_flux_preset_shows_its_fields_when_the_family_is_not_known(app):
    outputs = handler(app.blocks, "traindeck_load_preset")("LoRA_FLUX_dev")
    by_name = dict(zip(form.FORM_FIELDS, outputs))
    assert by_name["timestep_sampling"]["value"] == "flux_shift" and "value" not in by_name["model"]
    loaded = [by_name[n]["value"] for n in form.FAMILY_FIELDS]
    then = handler(app.blocks, "traindeck_preset_view")  # runs after the load, with the loaded values
    assert _flux_shown(then("LoRA", "", *loaded)) == (set(form.FAMILY_FIELDS), True)
    assert _flux_shown(handler(app.blocks, "traindeck_settings_view")("LoRA", "", *FAMILY_DEFAULTS)) == (set(), False)
    assert _flux_shown(handler(app.blocks, "traindeck_refresh_view")("LoRA", "", *loaded))[1] is True


def test_flux_part_fields_pick_the_hosts_files(app, tmp_path):
    import gradio as gr

    for name in form.PART_FIELDS:
        assert isinstance(app.train.fields[name], gr.Dropdown), name
    assert set(form.PART_FIELDS) == {"clip_l", "clip_g", "t5xxl", "ae", "qwen3"}
    more = tmp_path / "more-models"
    for name in ("clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"):
        header_file(more / name, "flux")
    app.ctl.host.model_dirs.append(more)
    model, vae, *parts = handler(app.blocks, "traindeck_refresh_models")()
    assert len(parts) == len(form.PART_FIELDS)
    for update in parts:
        assert {"", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"} <= set(update["choices"])


def test_start_trains_through_the_queue_and_the_plot_shows_it(app, tmp_path):
    message = handler(app.blocks, "traindeck_start")(*values(app, save_lora_name="ui-job"))[0]
    assert message.startswith("queued ui-job"), message
    status = wait_idle(app)
    assert "ui-job done" in status and (tmp_path / "out" / "ui-job.safetensors").is_file()
    log_update, figure, note = handler(app.blocks, "traindeck_plot_refresh")(None)
    assert figure is not None and note.endswith(": 3 steps") and log_update["value"].endswith(".csv")
    saved, note = handler(app.blocks, "traindeck_plot_save")(log_update["value"])
    assert saved.endswith(".png") and (tmp_path / "logs" / log_update["value"]).with_suffix(".png").is_file()


def test_a_bad_value_is_refused_naming_the_field(app):
    message, where, *groups = handler(app.blocks, "traindeck_start")(*values(app, train_batch_size="abc"))
    assert message == "error: Batch size: expected a number (got 'abc')"
    assert json.loads(where) == {"id": "traindeck-train-batch-size", "label": "Batch size",
                                 "text": "Batch size: expected a number (got 'abc')"}
    assert all("open" not in g for g in groups)  # a field at the top: no group to open
    assert app.ctl.queue.snapshot() == []


def test_presets_load_and_save(app, tmp_path):
    outputs = handler(app.blocks, "traindeck_load_preset")("iLECO")
    by_name = dict(zip([*form.FORM_FIELDS, *(f"2nd_{n}" for n in SECOND_PASS_FIELDS)], outputs[:-1]))
    assert outputs[-1] == "loaded preset iLECO"
    assert by_name["mode"]["value"] == "iLECO" and by_name["train_iterations"]["value"] == "300"
    assert "value" not in by_name["model"]  # the preset's empty model keeps the model picked
    save = handler(app.blocks, "traindeck_save_preset")
    update, note = save("mine", *values(app, network_rank="7"))
    assert note.startswith("saved preset") and json.loads((tmp_path / "presets" / "mine.json").read_text())["network_rank"] == 7
    assert "mine" in update["choices"]
    _, note = save("mine", *values(app))
    assert note.startswith("error: preset") and "already exists" in note


def test_settings_json_loads_only_from_its_folder(app, tmp_path):
    (tmp_path / "jsons" / "20260101").mkdir(parents=True)
    (tmp_path / "jsons" / "20260101" / "run.json").write_text(json.dumps({"mode": "ADDifT", "network_rank": "3"}))
    load = handler(app.blocks, "traindeck_load_settings")
    outputs = load("20260101/run.json")
    assert outputs[-1] == "loaded settings 20260101/run.json" and outputs[0]["value"] == "ADDifT"
    assert load("../queue.json")[-1].startswith("error: settings")


def test_queue_tab_deletes_and_reorders(app):
    add = handler(app.blocks, "traindeck_add")
    for name in ("a", "b", "c"):
        assert add(*values(app, save_lora_name=name))[0].startswith(f"added {name}")
    assert add(*values(app, save_lora_name="a"))[0] == "error: Output name: is already queued or running (got 'a')"
    choices = app.ctl.job_choices()
    table, job, note = handler(app.blocks, "traindeck_queue_delete")(choices[0])
    assert [r[2] for r in table["value"]] == ["b", "c"]
    table, job, note = handler(app.blocks, "traindeck_queue_up")(choices[2])
    assert [r[2] for r in table["value"]] == ["c", "b"] and job["value"] == choices[2].replace("queued", "queued")
    table, _, note = handler(app.blocks, "traindeck_queue_delete")(None)
    assert note == "error: job: choose a job in the list first (got None)"
    table, _, note = handler(app.blocks, "traindeck_queue_clear")(None)
    assert note == "cleared 2 jobs" and app.ctl.queue.snapshot() == []


def test_queued_jobs_survive_a_restart_and_wait_for_start(app, tmp_path):
    handler(app.blocks, "traindeck_add")(*values(app, save_lora_name="later"))
    app.ctl.close()
    again = Controller(app.ctl.host, tmp_path / "queue.json", fallbacks=app.ctl.fallbacks, device="cpu")
    try:
        assert [(r["name"], r["state"]) for r in again.queue.snapshot()] == [("later", "queued")]
        assert not again.queue.running and "1 queued (press Start)" in again.status()
    finally:
        again.close()


def test_uploaded_images_are_kept_for_queued_jobs(app, tmp_path):
    orig, targ = write_pair(tmp_path / "upload")
    add = handler(app.blocks, "traindeck_add")
    note = add(*values(app, mode="ADDifT", save_lora_name="pair", diff_original_image=str(orig),
                       diff_target_image=str(targ)))[0]
    assert note.startswith("added pair"), note
    orig.unlink()
    targ.unlink()  # gradio's temp files go away; the queued job keeps its own copies
    settings = app.ctl.queue.snapshot()[0]
    job = app.ctl.queue.get(settings["id"]).config()
    assert job.diff_original_image.startswith(str(tmp_path / "uploads"))
    assert handler(app.blocks, "traindeck_queue_start")(None)[2] == "started"
    assert "pair done" in wait_idle(app)


def test_samples_appear_in_the_gallery(app, tmp_path):
    start = handler(app.blocks, "traindeck_start")
    assert start(*values(app, save_lora_name="s", sample_every_n_steps="2", sample_prompts="a red circle\na blue square",
                         sample_steps="2"))[0].startswith("queued s")
    wait_idle(app)
    files = sorted(p.name for p in (tmp_path / "out" / "s_samples").glob("*.png"))
    assert files == ["s_000002steps_0.png", "s_000002steps_1.png", "s_000003steps_0.png", "s_000003steps_1.png"]
    status, gallery, grid, _, _ = app.poll_status()
    assert [p.rsplit("/", 1)[-1] for p in gallery["value"]] == ["s_000003steps_0.png", "s_000003steps_1.png"]
    assert grid.get("value") is None  # no evaluation grid was asked for


def test_the_evaluation_grid_shows_after_the_job(app, tmp_path):
    from PIL import Image

    from trainer.training.evalgrid import read_grid_info

    assert app.train.grid.elem_id == "traindeck-grid" and app.ctl.grid() is None
    start = handler(app.blocks, "traindeck_start")
    assert start(*values(app, save_lora_name="g", save_per_steps="2", sample_every_n_steps="3",
                         sample_prompts="a red circle", eval_grid=True, eval_grid_strengths="0, 1",
                         sample_steps="2"))[0].startswith("queued g")
    assert "evaluation grid" in wait_idle(app)
    grid = tmp_path / "out" / "g_grid.png"
    info = read_grid_info(grid)
    assert info["files"] == ["g_2steps.safetensors", "g.safetensors"] and info["prompts"] == ["a red circle"]
    assert Image.open(grid).width == info["layout"]["label_w"] + 2 * 64
    status, gallery, image, _, _ = app.poll_status()
    assert image["value"] == str(grid) and "evaluation grid" in status
    # the samples keep their gallery; the grid is not one of them
    assert [p.rsplit("/", 1)[-1] for p in gallery["value"]] == ["g_000003steps_0.png"]
    assert app.poll_status()[2].get("value") is None  # unchanged: no new update


def test_preview_shows_busy_then_each_image_in_its_own_box(app):
    form_values = values(app, mode="iLECO", original_prompt="a cat", target_prompt="a dog",
                         sample_steps="2")[:len(form.FORM_FIELDS)]
    shown = {}
    for which in ("original", "target"):
        steps = list(handler(app.blocks, f"traindeck_preview_{which}")(*form_values))
        (busy_button, busy_image, busy_note), (button, image, note) = steps
        assert (busy_button["value"], busy_button["interactive"]) == ("Generating…", False)
        assert "value" not in busy_image and busy_note.startswith(f"generating the {which} preview")
        assert button["interactive"] is True and button["value"] == f"Generate {which}"
        assert image.size == (64, 64) and note == f"generated the {which} prompt with the base model"
        shown[which] = image
    assert app.train.preview_images["original"] is not app.train.preview_images["target"]
    assert shown["original"].tobytes() != shown["target"].tobytes()  # two prompts, two pictures


def test_copy_settings_from_the_first_pass(app):
    copy = handler(app.blocks, "traindeck_copy_first")
    first = [app.train.fields[n].value for n in SECOND_PASS_FIELDS]
    assert [u["value"] for u in copy(*first)] == first


@pytest.mark.parametrize("save", [False, True])
def test_stop_buttons_stop_the_running_job(app, tmp_path, save):
    import time

    start = handler(app.blocks, "traindeck_start")
    assert start(*values(app, save_lora_name="long", train_iterations="100000"))[0].startswith("queued long")
    end = time.monotonic() + 60
    while (app.ctl.queue.current() is None or app.ctl.queue.current().step < 2) and time.monotonic() < end:
        time.sleep(0.05)
    note = handler(app.blocks, "traindeck_stop_save" if save else "traindeck_stop")()
    assert note == ("stopping and saving what it has" if save else "stopping without saving")
    status = wait_idle(app)
    assert "long stopped" in status
    assert (tmp_path / "out" / "long.safetensors").is_file() == save
    assert handler(app.blocks, "traindeck_stop")() == "nothing is training"
