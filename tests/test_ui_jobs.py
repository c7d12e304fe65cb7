"""The Train and Queue tabs as a user meets them, through the Blocks' own handlers (gradio 3.41
and 4.40): errors at the field when a job is added, the live queue, current messages, grouped
options, presets that keep the user's data, and buttons only where their mode uses them."""
from __future__ import annotations

import json
import shutil

import pytest

from trainer.config.schema import SECOND_PASS_FIELDS
from trainer.ui import form

from tests.modekit import write_pair
from tests.uikit import app, demo_root, handler, values, wait_idle  # noqa: F401 (fixtures)

pytestmark = pytest.mark.ui


def add(app, **changes) -> tuple[str, dict | None, dict]:
    """Add to Queue: (message, field error payload, {group: update})."""
    message, where, *opened = handler(app.blocks, "traindeck_add")(*values(app, **changes))
    return message, (json.loads(where) if where else None), dict(zip(app.train.groups, opened))


def opened(groups: dict) -> list[str]:
    return [key for key, update in groups.items() if update.get("open")]


def test_checks_run_when_the_job_is_added_and_show_at_the_field(app, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "taken.safetensors").write_bytes(b"x")
    cases = [  # (change, label shown, elem_id, problem)
        ({"lora_data_directory": ""}, "Image folder", "traindeck-lora-data-directory", "no image folder given"),
        ({"lora_data_directory": str(tmp_path / "nope")}, "Image folder", "traindeck-lora-data-directory",
         "folder does not exist"),
        ({"lora_data_directory": str(tmp_path / "empty")}, "Image folder", "traindeck-lora-data-directory",
         "folder has no images"),
        ({"save_lora_name": "taken"}, "Output name", "traindeck-save-lora-name", "taken.safetensors already exists"),
        ({"train_iterations": "abc"}, "Iterations", "traindeck-train-iterations", "expected a number"),
        ({"image_size": "9000"}, "Image size (height, width)", "traindeck-image-size", "must be at most 8192"),
    ]
    for change, label, elem_id, problem in cases:
        message, where, groups = add(app, **change)
        assert message.startswith(f"error: {label}: ") and problem in message, message
        assert where["id"] == elem_id and where["label"] == label and where["text"] == message[len("error: "):]
        assert opened(groups) == []  # these fields are at the top, never folded
    assert app.ctl.queue.snapshot() == []
    message, where, _ = add(app, save_lora_name="taken", save_overwrite=True)
    assert message.startswith("added taken") and where is None


def test_a_refused_optional_setting_opens_its_group(app):
    message, where, groups = add(app, noise_offset_random_strength=True)
    assert message == "error: Random noise offset: needs 'Noise offset' above 0 (got True)"
    assert where["id"] == "traindeck-noise-offset-random-strength" and opened(groups) == ["noise"]
    message, where, groups = add(app, mode="Difference", **{"2nd_train_iterations": "many"})
    assert message == "error: 2nd pass: Iterations: expected a number (got 'many')"
    assert where["id"] == "traindeck-2nd-train-iterations" and opened(groups) == ["second"]


def test_a_pair_of_different_sizes_names_the_users_files(app, tmp_path):
    orig, _ = write_pair(tmp_path / "up1", stem="before", size=(64, 64))
    _, targ = write_pair(tmp_path / "up2", stem="after", size=(64, 48))
    message, where, _ = add(app, mode="Difference", diff_original_image=str(orig), diff_target_image=str(targ))
    assert message == ("error: Target image: is 64x48 but the original image before.png is 64x64; the two images "
                       "of a pair must be the same size (got 'after_target.png')")
    assert where["id"] == "traindeck-diff-target-image" and "uploads" not in message


def test_the_queue_tab_follows_by_itself(app, tmp_path):
    poll = app.queue.poll  # what the timer calls every few seconds
    table, job, seen = poll("")
    assert table["value"] == [[""] * 7] and job["choices"] == [] and "value" not in job
    assert poll(seen) == [{"__type__": table["__type__"]}, {"__type__": table["__type__"]}, seen]
    add(app, save_lora_name="one")
    table, job, seen = poll(seen)
    assert [r[2] for r in table["value"]] == ["one"] and job["choices"] == app.ctl.job_choices()
    assert "value" not in job  # the user's pick is never reset by the timer
    pick = job["choices"][0]
    assert handler(app.blocks, "traindeck_queue_start")(pick)[2] == "started"
    wait_idle(app)
    table, job, seen = poll(seen)
    row = table["value"][0]
    assert row[4] == "done" and row[5].startswith("3/3 · loss ") and row[6].startswith("saved ")
    assert job["choices"] == [pick]  # the same label while the job queues, runs and ends


def test_the_timers_carry_what_each_page_has_seen(app):
    """Wired as gradio runs them: 4.x ticks with the State's latest value; 3.x calls a polling
    load once with its first inputs, so the loop itself must pass the State on."""
    import inspect

    add(app, save_lora_name="seen")
    for api_name, note in (("traindeck_poll_status", 3), ("traindeck_poll_queue", 0)):
        fn = handler(app.blocks, api_name)
        first = fn(0 if note == 3 else "")
        if inspect.isgenerator(first):  # gradio 3: one endless call
            ticks = first
            first, second = next(ticks), next(ticks)
            ticks.close()
        else:
            second = fn(first[-1])
        assert "value" in first[note] and "value" not in second[note], api_name
        assert second[-1] == first[-1]


def test_the_message_box_shows_the_latest_event(app, tmp_path):
    poll = app.poll_status  # what the timer calls every second
    data = tmp_path / "mine"
    shutil.copytree(app.train.fields["lora_data_directory"].value, data)
    message, _, _ = add(app, save_lora_name="gone", lora_data_directory=str(data))
    assert message.startswith("added gone")
    status, _, _, note, seen = poll(0)
    assert note["value"] == message
    shutil.rmtree(data)  # the folder goes away before the job's turn: it fails when it runs
    handler(app.blocks, "traindeck_queue_start")(None)
    wait_idle(app)
    status, _, _, note, seen = poll(seen)
    assert note["value"].startswith("gone failed: lora_data_directory: folder does not exist")
    assert "gone failed" in status
    assert "value" not in poll(seen)[3]  # shown once: a message typed since stays


def test_options_are_folded_in_groups_from_the_schema(app):
    titles = {key: acc.label for key, acc in app.train.groups.items()}
    assert list(titles)[:-1] == list(form.GROUP_FIELDS) and titles["second"] == "2nd pass (Difference)"
    assert all(acc.open is False for acc in app.train.groups.values())
    for name in SECOND_PASS_FIELDS:
        assert app.train.second[name].label == f"2nd pass: {form.PARAMS[name].label}"
    assert app.train.fields["noise_offset"].elem_id == "traindeck-noise-offset"


def test_loading_a_preset_keeps_the_users_folder_and_images(app, tmp_path):
    load = handler(app.blocks, "traindeck_load_preset")
    names = [*form.FORM_FIELDS, *(f"2nd_{n}" for n in SECOND_PASS_FIELDS)]
    for preset in ("LoRA", "Difference", "ADDifT", "iLECO"):
        by_name = dict(zip(names, load(preset)[:-1]))
        for kept in ("lora_data_directory", "diff_original_image", "diff_target_image", "model"):
            assert "value" not in by_name[kept], (preset, kept)  # the preset leaves them empty: untouched
    preset = json.loads((tmp_path / "presets" / "LoRA.json").read_text())
    preset["lora_data_directory"] = str(tmp_path / "theirs")
    (tmp_path / "presets" / "Theirs.json").write_text(json.dumps(preset))
    by_name = dict(zip(names, load("Theirs")[:-1]))
    assert by_name["lora_data_directory"]["value"] == str(tmp_path / "theirs")  # a preset that sets it wins
