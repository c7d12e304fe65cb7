"""install.py: the plan, the constraints file, the vocabulary and T5 tokenizer fetches, and --dry-run.

Nothing here reaches pip or the network: pip is a recording fake.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("traindeck_install", ROOT / "install.py")
install = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = install  # dataclasses look their module up while it executes
_spec.loader.exec_module(install)

A1111 = {  # A1111 1.10.1 in the a1111 profile: no diffusers, no peft
    "torch": "2.13.0+cpu", "gradio": "3.41.2", "transformers": "4.30.2", "accelerate": "0.21.0",
    "safetensors": "0.4.2", "numpy": "1.26.2", "pillow": "9.5.0", "huggingface-hub": "0.36.2",
    "fastapi": "0.94.0", "pydantic": "1.10.27", "einops": "0.4.1", "psutil": "5.9.5",
}
FORGE = {
    "torch": "2.13.0+cpu", "gradio": "4.40.0", "diffusers": "0.31.0", "transformers": "4.46.1",
    "accelerate": "0.31.0", "peft": "0.13.2", "safetensors": "0.4.2", "numpy": "1.26.2",
    "pillow": "9.5.0", "huggingface-hub": "0.26.2", "tqdm": "4.66.1", "einops": "0.4.1",
}
TRANSFORMERS5 = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "accelerate": "1.15.0", "numpy": "2.4.6"}


def planned(plan) -> dict[str, Requirement]:
    """The plan's lines parsed by packaging: each must be a valid pip requirement."""
    reqs = [Requirement(line) for line in plan.install]
    return {install.canonical(r.name): r for r in reqs}


def constraint_lines(text: str) -> list[Requirement]:
    """Parse a constraints file the way pip does: comments dropped, one requirement a line."""
    lines = (line.split(" #")[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def test_a1111_gets_diffusers_0_31_and_never_peft_or_torch():
    plan = install.make_plan(A1111)
    reqs = planned(plan)
    assert str(reqs["diffusers"].specifier) == "==0.31.0"
    assert str(reqs["lycoris-lora"].specifier) == "==4.1.3"
    assert "peft" not in reqs and "torch" not in reqs and "transformers" not in reqs
    assert plan.errors == []


def test_forge_keeps_its_diffusers():
    reqs = planned(install.make_plan(FORGE))
    assert "diffusers" not in reqs and "peft" not in reqs and "tqdm" not in reqs
    assert "lycoris-lora" in reqs  # what Forge lacks is still planned


def test_transformers_5_gets_a_recent_diffusers():
    spec = planned(install.make_plan(TRANSFORMERS5))["diffusers"].specifier
    assert spec.contains("0.42.1") and not spec.contains("0.31.0") and not spec.contains("0.41.0")


def test_missing_host_packages_are_errors_not_installs():
    plan = install.make_plan({"numpy": "1.26.2"})
    assert any("torch" in e for e in plan.errors) and any("transformers" in e for e in plan.errors)
    assert not {"torch", "transformers"} & set(planned(plan))


def test_an_installed_package_outside_the_tested_range_is_kept_with_a_note():
    plan = install.make_plan({**A1111, "lycoris-lora": "3.4.0"})
    assert "lycoris-lora" not in planned(plan)
    assert any("lycoris-lora 3.4.0" in note for note in plan.notes)


def test_every_optimizer_package_is_planned_except_bitsandbytes():
    """install.py covers trainer/training/optim.py's packages; bitsandbytes is hardware-specific, torch/transformers the host's."""
    from trainer.training.optim import OPTIMIZER_PACKAGES

    needed = {install.canonical(name) for name, _ in install.NEEDS}
    wanted = {install.canonical(pkg) for pkg in OPTIMIZER_PACKAGES.values()} - {"bitsandbytes", *install.HOST_ONLY}
    assert wanted and wanted <= needed


names = st.sampled_from(sorted({n for n, _ in install.NEEDS} | {"diffusers", "peft", "torch", "transformers", "numpy"}))
versions = st.tuples(st.integers(0, 12), st.integers(0, 60), st.integers(0, 9)).map(lambda t: ".".join(map(str, t)))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(names, versions))
def test_plan_never_names_an_installed_package_nor_a_forbidden_one(installed):
    reqs = planned(install.make_plan(installed))
    assert not set(reqs) & set(installed)
    assert not set(reqs) & install.NEVER


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True), versions))
def test_constraints_pin_every_installed_distribution(installed):
    pins = {install.canonical(r.name): r.specifier for r in constraint_lines(install.constraints_text(installed))}
    for name, version in installed.items():
        assert str(pins[install.canonical(name)]) == f"=={version}"
    for absent in {"torch", "peft"} - set(installed):
        assert not pins[absent].contains("0.0.1") and not pins[absent].contains("2.13.0")


def test_constraints_of_this_environment_pin_every_real_distribution():
    text = install.constraints_text(install.installed_versions())
    pins = {install.canonical(r.name): r.specifier for r in constraint_lines(text)}
    for dist in importlib.metadata.distributions():
        assert install.canonical(dist.metadata["Name"]) in pins
    assert str(pins["pytest"]) == f"=={importlib.metadata.version('pytest')}"


def test_a_version_pip_cannot_parse_is_left_out_as_a_comment():
    text = install.constraints_text({"odd": "not a version", "fine": "1.0"})
    assert {r.name for r in constraint_lines(text)} >= {"fine"} and "odd" not in {r.name for r in constraint_lines(text)}
    assert "# odd 'not a version'" in text


@settings(max_examples=300, deadline=None)
@given(versions, st.sampled_from(["==0.31.0", ">=0.4", ">=0.2.4,<0.3", ">=3.8,<5", "==0.42.*", "!=1.0", "<=2,>1.1"]))
def test_satisfies_agrees_with_packaging(version, spec):
    assert install.satisfies(version, spec) == SpecifierSet(spec).contains(Version(version))


def test_pip_arguments_never_upgrade():
    args = install.pip_install_args(["diffusers==0.31.0"], Path("c.txt"))
    assert args[0] == "install" and args[-1] == "diffusers==0.31.0"
    assert args[args.index("--constraint") + 1] == "c.txt"
    assert not {"-U", "--upgrade", "--force-reinstall", "--upgrade-strategy"} & set(args)


def test_install_packages_passes_the_constraints_and_refuses_a_moved_package(monkeypatch, tmp_path):
    seen: list[list[str]] = []

    def fake_pip(args: list[str], desc: str) -> None:
        seen.append(args)
        seen.append(Path(args[args.index("--constraint") + 1]).read_text().splitlines())

    plan = install.make_plan(A1111)
    monkeypatch.setattr(install, "installed_versions", lambda: {**A1111, **{r: "1.0" for r in planned(plan)}})
    install.install_packages(plan, A1111, fake_pip)
    assert seen[0][-len(plan.install):] == plan.install
    assert "transformers==4.30.2" in seen[1] and "torch==2.13.0+cpu" in seen[1] and any(x.startswith("peft<0") for x in seen[1])
    monkeypatch.setattr(install, "installed_versions", lambda: {**A1111, "numpy": "2.0.0", **{r: "1.0" for r in planned(plan)}})
    with pytest.raises(install.InstallError, match="numpy 1.26.2 -> 2.0.0"):
        install.install_packages(plan, A1111, fake_pip)


def test_quote_for_the_webui_shell():
    assert install._quote("diffusers>=0.42,<0.43") == '"diffusers>=0.42,<0.43"'
    assert install._quote("--no-deps") == "--no-deps"


# --- the vocabulary -------------------------------------------------------------------

MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_extract_takes_the_right_member(tmp_path):
    good = b"the vocabulary" * 100
    wheel = make_wheel(tmp_path / "w.whl", {"open_clip/other.txt.gz": b"decoy", MEMBER: good})
    dest = tmp_path / "cache" / "clip" / "vocab.gz"
    install.extract_vocab(wheel, (MEMBER,), dest, hashlib.sha256(good).hexdigest())
    assert dest.read_bytes() == good
    assert sorted(p.name for p in dest.parent.iterdir()) == ["vocab.gz"]
    assert dest.stat().st_mode & 0o777 == 0o644


def test_extract_falls_back_to_the_second_member(tmp_path):
    good = b"clip's copy"
    wheel = make_wheel(tmp_path / "w.whl", {"clip/bpe_simple_vocab_16e6.txt.gz": good})
    dest = tmp_path / "v.gz"
    install.extract_vocab(wheel, (MEMBER, "clip/bpe_simple_vocab_16e6.txt.gz"), dest, hashlib.sha256(good).hexdigest())
    assert dest.read_bytes() == good


def test_extract_refuses_a_wrong_hash_and_keeps_the_old_file(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", {MEMBER: b"tampered"})
    dest = tmp_path / "clip" / "v.gz"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    with pytest.raises(install.InstallError, match="sha256"):
        install.extract_vocab(wheel, (MEMBER,), dest, hashlib.sha256(b"genuine").hexdigest())
    assert dest.read_bytes() == b"old" and [p.name for p in dest.parent.iterdir()] == ["v.gz"]


def test_extract_refuses_a_wheel_without_the_member(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", {"other/file": b"x"})
    with pytest.raises(install.InstallError, match="holds none"):
        install.extract_vocab(wheel, (MEMBER,), tmp_path / "v.gz", "0" * 64)
    assert not (tmp_path / "v.gz").exists()


def test_a_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    good = b"abc" * 1000
    wheel = make_wheel(tmp_path / "w.whl", {MEMBER: good})
    dest = tmp_path / "clip" / "v.gz"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(install.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        install.extract_vocab(wheel, (MEMBER,), dest, hashlib.sha256(good).hexdigest())
    assert list(dest.parent.iterdir()) == []


def test_vocab_needed_checks_the_cached_file(tmp_path, monkeypatch):
    target = tmp_path / "clip" / "v.gz"
    monkeypatch.setattr(install, "packaged_vocab", lambda: None)
    assert "neither" in install.vocab_needed(target)
    target.parent.mkdir()
    target.write_bytes(b"data")
    assert "wrong checksum" in install.vocab_needed(target)
    monkeypatch.setattr(install, "VOCAB_SHA256", hashlib.sha256(b"data").hexdigest())
    assert install.vocab_needed(target) is None


def test_the_pinned_hash_is_the_real_vocabulary():
    """The vocabulary install.py put in place (or a package ships) has the pinned hash and its format."""
    path = install.vocab_target() if install.vocab_target().is_file() else install.packaged_vocab()
    assert path is not None, "run `python install.py --vocab-only` first"
    assert install.sha256_of(path) == install.VOCAB_SHA256
    import gzip

    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    assert len(lines) > 48894 and lines[1].split() == ["i", "n"]


# --- T5's tokenizer ------------------------------------------------------------------

T5_MEMBER = "invokeai/backend/t5/tokenizer/tokenizer.json"
T5_JSON = b'{"version": "1.0", "model": {"type": "Unigram"}}'


def wheel_pip(wheels: dict[str, Path], calls: list[list[str]]):
    """A pip that 'downloads' by copying the wheel made for the requirement, and fails for any other."""
    def pip(args: list[str], desc: str) -> None:
        calls.append(args)
        requirement = next(a for a in args if "==" in a)
        if requirement not in wheels:
            raise install.InstallError(f"`pip {' '.join(args)}` exited with 1:\nCollecting {requirement}\nERROR: no network")
        (Path(args[args.index("-d") + 1]) / wheels[requirement].name).write_bytes(wheels[requirement].read_bytes())
    return pip


def test_t5_tokenizer_is_fetched_from_the_pinned_wheel_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(install, "T5_SHA256", hashlib.sha256(T5_JSON).hexdigest())
    wheel = make_wheel(tmp_path / "invokeai-6.14.2-py3-none-any.whl",
                       {"invokeai/backend/t5/t5_tokenizer.py": b"decoy", T5_MEMBER: T5_JSON})
    calls: list[list[str]] = []
    dest = tmp_path / "cache" / "t5" / "tokenizer.json"
    assert install.fetch_t5_tokenizer(wheel_pip({"invokeai==6.14.2": wheel}, calls), dest) == dest
    assert dest.read_bytes() == T5_JSON and [p.name for p in dest.parent.iterdir()] == ["tokenizer.json"]
    assert dest.stat().st_mode & 0o777 == 0o644
    assert len(calls) == 1 and calls[0][0] == "download"
    assert {"--no-deps", "--only-binary=:all:", "invokeai==6.14.2"} <= set(calls[0])


def test_t5_tokenizer_with_a_wrong_checksum_is_refused_and_nothing_is_left(tmp_path):
    wheel = make_wheel(tmp_path / "invokeai-6.14.2-py3-none-any.whl", {T5_MEMBER: T5_JSON})  # not the pinned file
    dest = tmp_path / "cache" / "t5" / "tokenizer.json"
    with pytest.raises(install.InstallError, match=f"sha256 {hashlib.sha256(T5_JSON).hexdigest()}, expected {install.T5_SHA256}"):
        install.fetch_t5_tokenizer(wheel_pip({"invokeai==6.14.2": wheel}, []), dest)
    assert not (tmp_path / "cache").exists()


def test_t5_needed_checks_the_cached_file(tmp_path, monkeypatch):
    target = tmp_path / "t5" / "tokenizer.json"
    assert "not in" in install.t5_needed(target)
    target.parent.mkdir()
    target.write_bytes(T5_JSON)
    assert "wrong checksum" in install.t5_needed(target)
    monkeypatch.setattr(install, "T5_SHA256", hashlib.sha256(T5_JSON).hexdigest())
    assert install.t5_needed(target) is None


def with_cache(monkeypatch, tmp_path: Path, pip) -> None:
    """The cache under tmp_path with CLIP's vocabulary already in it; pip None: none may be made."""
    monkeypatch.setenv("TRAINDECK_CACHE", str(tmp_path / "cache"))
    vocab = tmp_path / "cache" / "clip" / install.VOCAB_NAME
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_bytes(b"vocabulary")
    monkeypatch.setattr(install, "VOCAB_SHA256", hashlib.sha256(b"vocabulary").hexdigest())
    monkeypatch.setattr(install, "make_pip", (lambda: (pip, None)) if pip else (lambda: pytest.fail("pip was needed")))


def in_process(monkeypatch, tmp_path: Path, pip, *args: str) -> int:
    """install.main --vocab-only with_cache()."""
    with_cache(monkeypatch, tmp_path, pip)
    return install.main(["--vocab-only", *args])


def test_a_good_cached_t5_tokenizer_means_no_pip_call(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(install, "T5_SHA256", hashlib.sha256(T5_JSON).hexdigest())
    (tmp_path / "cache" / "t5").mkdir(parents=True)
    (tmp_path / "cache" / "t5" / "tokenizer.json").write_bytes(T5_JSON)
    assert in_process(monkeypatch, tmp_path, None) == 0
    assert capsys.readouterr().out == "[traindeck install] nothing to install\n"


def test_a_wrong_cached_t5_tokenizer_is_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(install, "T5_SHA256", hashlib.sha256(T5_JSON).hexdigest())
    target = tmp_path / "cache" / "t5" / "tokenizer.json"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    wheel = make_wheel(tmp_path / "invokeai-6.14.2-py3-none-any.whl", {T5_MEMBER: T5_JSON})
    calls: list[list[str]] = []
    assert in_process(monkeypatch, tmp_path, wheel_pip({"invokeai==6.14.2": wheel}, calls)) == 0
    assert target.read_bytes() == T5_JSON and len(calls) == 1
    assert "has a wrong checksum" in capsys.readouterr().out


@pytest.mark.parametrize("wheel_member", [None, b"not the pinned file"])
def test_a_failed_t5_fetch_warns_in_one_line_and_the_install_goes_on(tmp_path, monkeypatch, capsys, wheel_member):
    wheels = {}
    if wheel_member is not None:
        wheels["invokeai==6.14.2"] = make_wheel(tmp_path / "invokeai-6.14.2-py3-none-any.whl", {T5_MEMBER: wheel_member})
    assert in_process(monkeypatch, tmp_path, wheel_pip(wheels, [])) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]
    target = tmp_path / "cache" / "t5" / "tokenizer.json"
    assert len(warnings) == 1 and warnings[0].startswith("[traindeck install] warning: T5's tokenizer is not in the cache")
    assert "diffusers FLUX folder" in warnings[0] and "Forge install" in warnings[0] and warnings[0].endswith(str(target))
    assert ("ERROR: no network" if wheel_member is None else "expected " + install.T5_SHA256) in warnings[0]
    assert [p.name for p in target.parent.iterdir()] == [install.T5_FAILED]  # no tokenizer, the failure noted


def start_up(monkeypatch, tmp_path: Path, pip, webui: Path | None = None) -> int:
    """install.main as a WebUI start-up runs it (no arguments), with nothing to install but the tokenizers."""
    monkeypatch.setattr(install, "make_plan", lambda installed: install.Plan())
    monkeypatch.setattr(install, "webui_root", lambda: webui or tmp_path / "webui")
    with_cache(monkeypatch, tmp_path, pip)
    return install.main([])


def test_after_a_failed_t5_fetch_start_ups_leave_it_alone_for_a_day(tmp_path, monkeypatch, capsys):
    """An offline machine pays pip's retries once a day, not at every WebUI start; asking by name still tries."""
    calls: list[list[str]] = []
    assert start_up(monkeypatch, tmp_path, wheel_pip({}, calls)) == 0
    assert len(calls) == 1
    mark = tmp_path / "cache" / "t5" / install.T5_FAILED
    stamp, reason = mark.read_text(encoding="utf-8").splitlines()
    assert abs(float(stamp) - time.time()) < 60 and "ERROR: no network" in reason
    capsys.readouterr()
    assert start_up(monkeypatch, tmp_path, None) == 0  # no pip at all
    out = capsys.readouterr().out
    assert "T5's tokenizer: not fetched: the last try, 0.0 h ago, failed (" in out and "ERROR: no network" in out
    assert "--vocab-only` tries now" in out
    assert in_process(monkeypatch, tmp_path, wheel_pip({}, calls)) == 0 and len(calls) == 2  # by name: tried
    mark.write_text(f"{time.time() - install.T5_RETRY_SECONDS - 1}\nold failure\n", encoding="utf-8")
    assert start_up(monkeypatch, tmp_path, wheel_pip({}, calls)) == 0 and len(calls) == 3  # a day on: tried


def test_a_successful_t5_fetch_forgets_an_earlier_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(install, "T5_SHA256", hashlib.sha256(T5_JSON).hexdigest())
    mark = tmp_path / "cache" / "t5" / install.T5_FAILED
    mark.parent.mkdir(parents=True)
    mark.write_text(f"{time.time() - install.T5_RETRY_SECONDS - 5}\nold failure\n", encoding="utf-8")
    wheel = make_wheel(tmp_path / "invokeai-6.14.2-py3-none-any.whl", {T5_MEMBER: T5_JSON})
    calls: list[list[str]] = []
    assert start_up(monkeypatch, tmp_path, wheel_pip({"invokeai==6.14.2": wheel}, calls)) == 0
    assert len(calls) == 1 and sorted(p.name for p in mark.parent.iterdir()) == ["tokenizer.json"]


def test_an_unreadable_failure_note_means_trying_again(tmp_path, monkeypatch, capsys):
    mark = tmp_path / "cache" / "t5" / install.T5_FAILED
    mark.parent.mkdir(parents=True)
    mark.write_text("not a time\n", encoding="utf-8")
    calls: list[list[str]] = []
    assert start_up(monkeypatch, tmp_path, wheel_pip({}, calls)) == 0 and len(calls) == 1
    assert f"warning: {mark} is unreadable" in capsys.readouterr().out


@pytest.mark.parametrize("folder", install.FORGE_T5_TOKENIZERS)
def test_inside_forge_its_own_t5_tokenizer_means_no_fetch(tmp_path, monkeypatch, capsys, folder):
    webui = tmp_path / "forge"
    (webui / folder).mkdir(parents=True)
    (webui / folder / "tokenizer.json").write_bytes(T5_JSON)
    assert start_up(monkeypatch, tmp_path, None, webui) == 0
    assert f"T5's tokenizer: not fetched: FLUX.1 jobs in this WebUI read its own at {webui / folder / 'tokenizer.json'}" \
        in capsys.readouterr().out


def test_install_knows_the_forge_folders_the_trainer_reads():
    from trainer.families.flux_parts import FORGE_T5_TOKENIZERS

    assert install.FORGE_T5_TOKENIZERS == FORGE_T5_TOKENIZERS


def test_the_webui_root_is_two_folders_above_the_extension():
    assert install.webui_root() == ROOT.parent.parent


def test_t5_from_a_local_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(install, "T5_SHA256", hashlib.sha256(T5_JSON).hexdigest())
    wheel = make_wheel(tmp_path / "local.whl", {T5_MEMBER: T5_JSON})
    assert in_process(monkeypatch, tmp_path, wheel_pip({}, []), "--t5-from", str(wheel)) == 0
    assert (tmp_path / "cache" / "t5" / "tokenizer.json").read_bytes() == T5_JSON


def test_the_trainer_looks_for_t5_where_install_puts_it(tmp_path, monkeypatch):
    from trainer.families.flux_parts import find_t5_tokenizer
    from trainer.paths import t5_tokenizer_candidates

    monkeypatch.setenv("TRAINDECK_CACHE", str(tmp_path / "cache"))
    assert t5_tokenizer_candidates()[0] == install.t5_target() == tmp_path / "cache" / "t5" / "tokenizer.json"
    install.t5_target().parent.mkdir(parents=True)
    install.t5_target().write_bytes(T5_JSON)
    assert find_t5_tokenizer(t5_tokenizer_candidates()) == install.t5_target()


# --- the command, with pip replaced by a recording fake ---------------------------------

FAKE_PIP = """
import json, shutil, sys
from pathlib import Path
log, wheels, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
with log.open("a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] == "download":
    name = next(a for a in args if "==" in a).split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(name + "-*.whl"))
    if not found:
        sys.exit(1)
    shutil.copy(found[0], args[args.index("-d") + 1])
"""


def run_install(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    fake = tmp_path / "fake_pip.py"
    fake.write_text(FAKE_PIP)
    (tmp_path / "wheels").mkdir(exist_ok=True)
    log = tmp_path / "pip.log"
    env = {**os.environ, "TRAINDECK_CACHE": str(tmp_path / "cache"),
           "TRAINDECK_PIP": f'"{sys.executable}" "{fake}" "{log}" "{tmp_path / "wheels"}"'}
    done = subprocess.run([sys.executable, str(ROOT / "install.py"), *args], check=False, env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    return done, log


def test_dry_run_prints_a_plan_and_never_calls_pip(tmp_path):
    done, log = run_install(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[traindeck install] would fetch the CLIP vocabulary" in done.stdout
    assert f"[traindeck install] would fetch T5's tokenizer into {tmp_path / 'cache' / 't5' / 'tokenizer.json'}" in done.stdout
    assert not log.exists()
    assert not (tmp_path / "cache").exists()


def test_vocab_fetch_falls_back_when_the_first_wheel_has_a_wrong_hash(tmp_path):
    real = install.vocab_target() if install.vocab_target().is_file() else install.packaged_vocab()
    assert real is not None, "run `python install.py --vocab-only` first"
    (tmp_path / "wheels").mkdir()
    make_wheel(tmp_path / "wheels" / "open_clip_torch-3.3.0-py3-none-any.whl", {MEMBER: b"wrong"})
    make_wheel(tmp_path / "wheels" / "clip_anytorch-2.6.0-py3-none-any.whl",
               {"clip/bpe_simple_vocab_16e6.txt.gz": real.read_bytes()})
    done, log = run_install(tmp_path, "--vocab-only")
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["download", "download", "download"]  # the third: T5's, which the fake lacks
    assert "--no-deps" in calls[0] and "open-clip-torch==3.3.0" in calls[0] and "clip-anytorch==2.6.0" in calls[1]
    assert "invokeai==6.14.2" in calls[2]
    cached = tmp_path / "cache" / "clip" / install.VOCAB_NAME
    assert cached.read_bytes() == real.read_bytes()
    assert "fetched the CLIP vocabulary" in done.stdout
    assert "warning: T5's tokenizer is not in the cache" in done.stdout  # optional: the install still succeeded


def test_vocab_fetch_fails_loudly_when_no_wheel_is_good(tmp_path):
    done, _log = run_install(tmp_path, "--vocab-only")
    assert done.returncode == 1
    assert "error: could not fetch the CLIP vocabulary" in done.stdout
    assert not (tmp_path / "cache" / "clip" / install.VOCAB_NAME).exists()


FAKE_LAUNCH = """
import json, os
class _Args:
    skip_install = os.environ.get("FAKE_SKIP_INSTALL") == "1"
args = _Args()
def run_pip(command, desc=None):
    with open(os.environ["FAKE_WEBUI_LOG"], "a") as f:
        f.write(json.dumps([command, desc]) + "\\n")
    return ""
"""


@pytest.mark.parametrize("skip", [False, True])
def test_under_the_webui_its_run_pip_is_used_and_skip_install_respected(tmp_path, skip):
    webui = tmp_path / "webui"
    (webui / "modules").mkdir(parents=True)
    (webui / "modules" / "launch_utils.py").write_text("")
    (webui / "launch.py").write_text(FAKE_LAUNCH)
    log = tmp_path / "run_pip.log"
    env = {k: v for k, v in os.environ.items() if k != "TRAINDECK_PIP"}
    env.update(PYTHONPATH=str(webui), TRAINDECK_CACHE=str(tmp_path / "cache"), FAKE_WEBUI_LOG=str(log),
               FAKE_SKIP_INSTALL="1" if skip else "0")
    done = subprocess.run([sys.executable, str(ROOT / "install.py"), "--vocab-only"], check=False, env=env,
                          cwd=webui, capture_output=True, text=True, timeout=120)
    if skip:
        assert done.returncode == 0 and "not installing: the WebUI runs with --skip-install" in done.stdout
        assert not log.exists()
        return
    commands = [json.loads(line)[0] for line in log.read_text().splitlines()]
    assert len(commands) == 2 and all(c.startswith("download ") and "--no-deps" in c for c in commands)
    assert "open-clip-torch==3.3.0" in commands[0] and "clip-anytorch==2.6.0" in commands[1]
    assert done.returncode == 1 and "pip left no wheel" in done.stdout  # the fake downloaded nothing
