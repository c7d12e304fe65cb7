"""The Plot tab's data: log names inside logs/ only, and the loss/learning-rate figure."""
from __future__ import annotations

import os
import time

import pytest
from PIL import Image

from trainer.config.params import ConfigError
from trainer.training.plot import latest_log, log_names, loss_figure, resolve_log, save_png
from trainer.training.runlog import CsvLog


def write_log(root, day: str, name: str, steps: int = 5, n_lrs: int = 2):
    path = root / day / f"{name}.csv"
    with CsvLog(path, {"save_lora_name": name, "network_rank": 4}, n_lrs) as log:
        for s in range(1, steps + 1):
            log.row(s, 1.0 / s, [1e-4 * s] * n_lrs, 1.5 / s)
    return path


def test_names_are_relative_and_newest_first(tmp_path):
    old = write_log(tmp_path, "20260101", "old")
    new = write_log(tmp_path, "20260102", "new")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert log_names(tmp_path) == ["20260102/new.csv", "20260101/old.csv"]
    assert latest_log(tmp_path) == new
    assert log_names(tmp_path / "missing") == [] and latest_log(tmp_path / "missing") is None


@pytest.mark.parametrize("name", ["../secret.csv", "/etc/passwd", "20260101/../../x.csv", "C:\\x.csv",
                                  "..\\x.csv", "", "20260101/old.txt", "20260101/none.csv"])
def test_names_outside_the_logs_folder_are_refused(tmp_path, name):
    write_log(tmp_path / "logs", "20260101", "old")
    (tmp_path / "secret.csv").write_text("Step,Loss\n1,1\n")
    with pytest.raises(ConfigError) as info:
        resolve_log(name, tmp_path / "logs")
    assert info.value.key == "log"


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    logs = tmp_path / "logs"
    write_log(logs, "20260101", "old")
    (tmp_path / "outside.csv").write_text("Step,Loss\n1,1\n")
    (logs / "20260101" / "link.csv").symlink_to(tmp_path / "outside.csv")
    with pytest.raises(ConfigError, match="outside the logs folder"):
        resolve_log("20260101/link.csv", logs)
    assert resolve_log("20260101/old.csv", logs) == (logs / "20260101" / "old.csv").resolve()


def test_figure_draws_raw_smoothed_and_each_learning_rate(tmp_path):
    path = write_log(tmp_path, "20260101", "cat", steps=7, n_lrs=2)
    fig = loss_figure(path)
    loss_ax, lr_ax = fig.axes
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == ["raw loss", "smoothed loss"]
    assert [line.get_label() for line in lr_ax.get_lines()] == ["learning rate 1", "learning rate 2"]
    raw, smooth = loss_ax.get_lines()
    assert list(raw.get_xdata()) == list(range(1, 8))
    assert list(smooth.get_ydata()) == pytest.approx([1.0 / s for s in range(1, 8)])
    assert list(lr_ax.get_lines()[0].get_ydata()) == pytest.approx([1e-4 * s for s in range(1, 8)])
    assert "cat" in loss_ax.get_title()


@pytest.mark.parametrize("groups, expected", [
    ("unet;unet_up", ["lr unet", "lr unet_up"]),
    ("unet", ["learning rate 1", "learning rate 2"]),  # one name for two columns: not trusted
    (None, ["learning rate 1", "learning rate 2"]),  # a TrainTrain log has no such row
])
def test_learning_rate_legend_names_the_optimizer_groups(tmp_path, groups, expected):
    header = {"save_lora_name": "dog", **({"lr_groups": groups} if groups else {})}
    path = tmp_path / "20260101" / "dog.csv"
    with CsvLog(path, header, 2) as log:
        log.row(1, 1.0, [1e-4, 2e-4], 1.0)
        log.row(2, 0.9, [1e-4, 2e-4], 0.8)
    _, lr_ax = loss_figure(path).axes
    assert [line.get_label() for line in lr_ax.get_lines()] == expected


def test_png_is_written_once(tmp_path):
    fig = loss_figure(write_log(tmp_path, "20260101", "cat"))
    out = save_png(fig, tmp_path / "plot.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (800, 450)
    with pytest.raises(FileExistsError):
        save_png(fig, out)
