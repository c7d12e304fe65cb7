"""The stand-ins follow the real hosts: what tests/record_host.py recorded from the real Forge and
A1111 (tests/fixtures/host_record.json) against the objects tests/webuikit.py builds from it."""
from __future__ import annotations

import copy

import pytest

from tests.record_host import describe, resolve
from tests.tiny import tiny_bundle
from tests.webuikit import a1111_model, fake_webui, forge_model, host_record

# The tiny VAE keeps 32 channels at every level, so it has no channel-changing shortcut convs.
SIZE_ONLY = {"vae": {"decoder.up.#.block.#.nin_shortcut.bias", "decoder.up.#.block.#.nin_shortcut.weight",
                     "encoder.down.#.block.#.nin_shortcut.bias", "encoder.down.#.block.#.nin_shortcut.weight"},
             "model": {"first_stage_model.decoder.up.#.block.#.nin_shortcut.bias",
                       "first_stage_model.decoder.up.#.block.#.nin_shortcut.weight",
                       "first_stage_model.encoder.down.#.block.#.nin_shortcut.bias",
                       "first_stage_model.encoder.down.#.block.#.nin_shortcut.weight"}}


def disagreements(standin: dict, recorded: dict, size_only: set[str] = frozenset()) -> list[str]:
    """Every way the stand-in's description differs from the recorded one."""
    got, want = standin["keys"], recorded["keys"]
    out = [f"missing {k}" for k in sorted(set(want) - set(got) - set(size_only))]
    out += [f"not in the host: {k}" for k in sorted(set(got) - set(want))]
    out += [f"{k}: {got[k]} here, {want[k]} in the host" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if standin["aliases"] != recorded["aliases"]:
        out.append(f"aliases {standin['aliases']} here, {recorded['aliases']} in the host")
    if recorded["inference"] is not None and standin["inference"] != recorded["inference"]:
        out.append(f"inference tensors: {standin['inference']} here, {recorded['inference']} in the host")
    return out


def forge_parts(model) -> dict:
    o = model.forge_objects
    return {"unet": o.unet.model.diffusion_model, "vae": o.vae.first_stage_model, "clip": o.clip.cond_stage_model}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_forge_stand_in_matches_the_record(family, tmp_path):
    rec = host_record()["forge"]
    with fake_webui("forge"):
        model = forge_model(tiny_bundle(family), tmp_path / "m.safetensors")
    for part, module in forge_parts(model).items():
        assert disagreements(describe(module, ""), rec[family][part], SIZE_ONLY.get(part, set())) == [], part
    assert {f: getattr(model, f) for f in rec[family]["flags"]} == rec[family]["flags"]
    stored = model.forge_objects.unet.model.diffusion_model.storage_dtype
    assert str(stored).replace("torch.", "") == rec[family]["unet_storage_dtype"]
    # where the adapter reads the prediction type (its value depends on the checkpoint, not the host)
    kinds = ("epsilon", "v_prediction")
    assert model.forge_objects.unet.model.predictor.prediction_type in kinds and rec[family]["prediction_type"] in kinds


def test_forge_lora_backups_live_where_the_adapter_reads_them(tmp_path):
    """The adapter reads `forge_objects.unet.model.lora_loader.backup` with keys under `diffusion_model.`
    and the joint text encoder's with its own keys: the recorded merge put them exactly there."""
    lora = host_record()["forge"]["sd1"]["lora"]
    assert lora["unet"]["loader"] == "forge_objects.unet.model.lora_loader"
    assert lora["clip"]["loader"] == "forge_objects.clip.cond_stage_model.lora_loader"
    assert all(k.startswith("diffusion_model.") for k in lora["unet"]["backup_keys"])
    with fake_webui("forge"):
        model = forge_model(tiny_bundle("sd1"), tmp_path / "m.safetensors")
    parts = forge_parts(model)
    unet_keys, clip_keys = (set(describe(parts[p], "")["keys"]) for p in ("unet", "clip"))
    assert {k[len("diffusion_model."):] for k in lora["unet"]["backup_keys"]} <= unet_keys
    assert set(lora["clip"]["backup_keys"]) <= clip_keys
    for part in lora.values():
        assert part["replaced"] and part["loaded_hash_after_merge"] and part["backup_after_plain_refresh"] == 0
        assert hasattr(resolve(model, part["loader"]), "backup")


def test_the_a1111_stand_in_matches_the_record(tmp_path):
    rec = host_record()["a1111"]["sd1"]
    with fake_webui("a1111"):
        model = a1111_model(tiny_bundle("sd1"), tmp_path / "m.safetensors")
    assert disagreements(describe(model, ""), rec["model"], SIZE_ONLY["model"]) == []
    assert {f: getattr(model, f) for f in rec["flags"]} == rec["flags"]
    assert model.parameterization == rec["parameterization"]


def test_a_disagreement_is_reported(tmp_path):
    rec = host_record()["forge"]["sd1"]["clip"]
    with fake_webui("forge"):
        clip = forge_parts(forge_model(tiny_bundle("sd1"), tmp_path / "m.safetensors"))["clip"]
    mine = describe(clip, "")
    changed = copy.deepcopy(rec)
    changed["aliases"] = []
    key = "clip_l.transformer.text_model.encoder.layers.#.mlp.fc1.weight"
    changed["keys"][key] = ["float32", 2]
    changed["keys"]["clip_l.transformer.text_model.embeddings.position_ids"] = ["int64", 2]
    found = disagreements(mine, changed)
    assert any("aliases" in f for f in found) and any(f.startswith(key) for f in found)
    assert "missing clip_l.transformer.text_model.embeddings.position_ids" in found
