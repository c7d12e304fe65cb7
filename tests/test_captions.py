"""Captions: .txt before .caption, trigger word, file name as tags, encodings."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.data import read_caption, scan_images
from trainer.data.scan import apply_trigger, filename_caption
from trainer.config.params import ConfigError


def _image(folder: Path, name: str = "img.png") -> Path:
    path = folder / name
    path.write_bytes(b"not decoded while captioning")
    return path


def test_txt_beats_caption(tmp_path):
    img = _image(tmp_path)
    (tmp_path / "img.txt").write_text("from txt", encoding="utf-8")
    (tmp_path / "img.caption").write_text("from caption", encoding="utf-8")
    assert read_caption(img) == "from txt"


def test_caption_used_without_txt(tmp_path):
    img = _image(tmp_path)
    (tmp_path / "img.caption").write_text("from caption", encoding="utf-8")
    assert read_caption(img) == "from caption"


def test_no_caption_file_is_empty(tmp_path):
    assert read_caption(_image(tmp_path)) == ""


def test_caption_of_dotted_name_uses_last_suffix(tmp_path):
    img = _image(tmp_path, "a.b.png")
    (tmp_path / "a.b.txt").write_text("dotted", encoding="utf-8")
    (tmp_path / "a.txt").write_text("wrong", encoding="utf-8")
    assert read_caption(img) == "dotted"


def test_trigger_first(tmp_path):
    img = _image(tmp_path)
    (tmp_path / "img.txt").write_text("1girl, smile", encoding="utf-8")
    assert read_caption(img, trigger="sks") == "sks, 1girl, smile"


@pytest.mark.parametrize("caption", ["sks, 1girl", "sks 1girl", "sks"])
def test_trigger_not_duplicated(tmp_path, caption):
    img = _image(tmp_path)
    (tmp_path / "img.txt").write_text(caption, encoding="utf-8")
    assert read_caption(img, trigger="sks") == caption


def test_trigger_prefix_of_a_word_is_still_added():
    assert apply_trigger("catgirl, smile", "cat") == "cat, catgirl, smile"


def test_trigger_only_without_caption(tmp_path):
    img = _image(tmp_path)
    assert read_caption(img, trigger="  my  trigger ") == "my trigger"
    (tmp_path / "img.txt").write_text("   \n", encoding="utf-8")
    assert read_caption(img, trigger="sks") == "sks"


def test_whitespace_collapses(tmp_path):
    img = _image(tmp_path)
    (tmp_path / "img.txt").write_text("a  photo\r\nof\t a\n\ncat \n", encoding="utf-8")
    assert read_caption(img) == "a photo of a cat"


def test_filename_as_tag(tmp_path):
    img = _image(tmp_path, "1girl_blue hair_smile_id_12345.png")
    assert read_caption(img, use_filename=True) == "1girl, blue hair, smile"
    assert read_caption(img, use_filename=True, trigger="sks") == "sks, 1girl, blue hair, smile"
    assert read_caption(img) == ""  # only when asked


def test_filename_as_tag_loses_to_caption_file(tmp_path):
    img = _image(tmp_path, "red_car.png")
    (tmp_path / "red_car.caption").write_text("a car", encoding="utf-8")
    assert read_caption(img, use_filename=True) == "a car"


@pytest.mark.parametrize("stem, expected", [
    ("plain", "plain"), ("a__b_", "a, b"), ("x_id_1_id_2", "x, id, 1"), ("dog_idle", "dog, idle"),
])
def test_filename_caption_rules(stem, expected):
    assert filename_caption(f"/data/{stem}.png") == expected


def test_utf8_bom_and_non_ascii(tmp_path):
    img = _image(tmp_path)
    (tmp_path / "img.txt").write_bytes("\ufeffcafé, 猫".encode("utf-8"))
    assert read_caption(img) == "café, 猫"


def test_non_utf8_is_config_error_naming_file(tmp_path):
    img = _image(tmp_path)
    bad = tmp_path / "img.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        read_caption(img)
    assert err.value.key == "lora_data_directory"
    assert err.value.value == str(bad)
    assert "UTF-8" in str(err.value) and str(bad) in str(err.value)


def test_scan_reports_bad_caption_before_any_caching(tmp_path):
    _image(tmp_path, "a.png")
    (tmp_path / "a.caption").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError) as err:
        scan_images(tmp_path)
    assert err.value.value == str(tmp_path / "a.caption")


def test_scan_applies_captions(tmp_path):
    _image(tmp_path, "a.png")
    _image(tmp_path, "b.png")
    (tmp_path / "a.txt").write_text("red", encoding="utf-8")
    items = scan_images(tmp_path, trigger="tw")
    assert [(i.path.name, i.caption) for i in items] == [("a.png", "tw, red"), ("b.png", "tw")]
