"""CSV logs: TrainTrain's layout, readable by pandas, one row per step."""
from __future__ import annotations

import csv

import pytest

from trainer.training.runlog import RAW, CsvLog, log_path, read_header, read_log


def test_log_path_layout(tmp_path):
    path = log_path("my lora", 1_700_000_000.0, "_copy", root=tmp_path)
    day = path.parent.name
    assert path.parent.parent == tmp_path and len(day) == 8 and day.isdigit()
    assert path.name.startswith("my lora-" + day + "_") and path.name.endswith("_copy.csv")


def test_rows_follow_traintrain_layout_and_read_back(tmp_path):
    path = tmp_path / "x.csv"
    with CsvLog(path, {"network_rank": 16, "save_lora_name": "x"}, n_lrs=2) as log:
        log.row(1, 0.5, [1e-4, 5e-5], 0.5)
        log.row(2, 0.46, [9e-5, 4e-5], 0.1)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["network_rank", "16"] and rows[1] == ["save_lora_name", "x"]
    assert rows[2] == ["Step", "Loss", "Learning Rate 1", "Learning Rate 2", RAW]
    header, frame = read_log(path)
    assert header == {"network_rank": "16", "save_lora_name": "x"}
    assert list(frame["Step"]) == [1, 2]
    assert frame["Loss"].tolist() == pytest.approx([0.5, 0.46])
    assert frame[RAW].tolist() == pytest.approx([0.5, 0.1])
    assert frame["Learning Rate 2"].tolist() == pytest.approx([5e-5, 4e-5])


def test_rows_are_visible_before_close(tmp_path):
    log = CsvLog(tmp_path / "live.csv", {}, n_lrs=1)
    log.row(1, 0.3, [1e-4], 0.3)
    _, frame = read_log(tmp_path / "live.csv")
    assert len(frame) == 1
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.row(2, 0.3, [1e-4], 0.3)


def test_existing_log_is_never_overwritten(tmp_path):
    path = tmp_path / "taken.csv"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        CsvLog(path, {}, n_lrs=1)
    assert path.read_text() == "keep me"


def test_a_file_without_step_header_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a training log"):
        read_header(path)
