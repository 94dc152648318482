"""Carry vLLM and what it needs onto a lent GPU machine that has no network, in sets of at most 60 MiB.

The lent machines have torch 2.11.0+cu130 and torchvision 0.26.0 (Python 3.12) and no vLLM; vLLM
0.26.0 pins exactly that torch. One `run` call carries at most 64 MiB of ignored files, but what it
carried stays on the warm machine for the next call, so the wheels travel in numbered sets, each in a
folder of its own (`build/gpu-carry/set-NN`). A wheel larger than a set (vLLM's is 290 MiB) is cut
into pieces; the machine joins them and checks every wheel's SHA-256 before installing.

Here (with a network):

    python bench/gpu/carry.py fetch                 # vLLM 0.26.0 + what it needs that the image lacks
    python bench/gpu/carry.py plan                  # cut and group into build/gpu-carry/set-NN/

On the machine, after one `run` call per set (each naming its folder in `carry`):

    python3 bench/gpu/carry.py assemble             # join, verify, leave the wheels in build/gpu-wheels-ready
    python3 bench/gpu/carry.py missing              # requirements still unmet there (should print nothing)

`fetch` follows each wheel's Requires-Dist (markers read for CPython 3.12 on x86-64 Linux) and
downloads, one name at a time with `--no-deps`, every requirement the image does not already have
(`IMAGE_PACKAGES`, the lent image's package list), except GPU kernel libraries vLLM imports only when
asked for them (`NOT_CARRIED`): those alone are gigabytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "build" / "gpu-wheels"
CARRY = ROOT / "build" / "gpu-carry"
READY = ROOT / "build" / "gpu-wheels-ready"
SET_LIMIT = 60 * 2**20
MANIFEST = "manifest.json"

ROOTS = ("vllm==0.26.0", "webdataset", "braceexpand")  # vLLM, and caprl's own needs the image lacks
# What the lent image holds (its package list of 2026-11-17; versions not listed there).
IMAGE_PACKAGES = frozenset(Path(__file__).with_name("image_packages.txt").read_text().split())
# GPU kernel libraries vLLM imports only for features caprl does not ask for (FlashInfer sampling and
# attention, TileLang, CUTLASS DSL kernels, MLA kernels, video decoding): without them vLLM uses its
# own FlashAttention and PyTorch sampling. Carried only if `missing` names them on the machine.
NOT_CARRIED = frozenset({
    "flashinfer-python", "flashinfer-cubin", "tilelang", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base",
    "quack-kernels", "tokenspeed-mla", "humming-kernels", "pynvvideocodec", "torchcodec", "fastsafetensors",
    "nvidia-cudnn-frontend", "apache-tvm-ffi", "torchaudio", "ray",
})
# The machine's interpreter, for reading requirement markers.
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64")


def normal(name: str) -> str:
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return normal(path.name.split("-")[0])


def requirements_of(wheel: Path, extras: frozenset[str] = frozenset()) -> list[str]:
    """The requirement strings of `wheel` that apply on the machine (with `extras` requested)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode("utf-8", "replace").splitlines()
    found = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is not None:
            wanted = [requirement.marker.evaluate(TARGET | {"extra": extra}) for extra in extras or {""}]
            if not any(wanted):
                continue
        found.append(str(requirement))
    return found


def unmet(wheels: list[Path], have: frozenset[str] = IMAGE_PACKAGES,
          skip: frozenset[str] = NOT_CARRIED) -> dict[str, str]:
    """Requirements of `wheels` (normalised name: requirement) that neither the image, nor another of
    `wheels`, nor the deliberate omissions cover. A requirement with extras (`fastapi[standard]`)
    also brings in what those extras of that wheel need."""
    from packaging.requirements import Requirement

    by_name = {wheel_name(wheel): wheel for wheel in wheels}
    covered = {normal(name) for name in have | skip} | set(by_name)
    needed: dict[str, str] = {}
    asked: list[tuple[Path, frozenset[str]]] = [(wheel, frozenset()) for wheel in wheels]
    seen: set[tuple[str, frozenset[str]]] = set()
    while asked:
        wheel, extras = asked.pop()
        if (wheel.name, extras) in seen:
            continue
        seen.add((wheel.name, extras))
        for text in requirements_of(wheel, extras):
            requirement = Requirement(text)
            name = normal(requirement.name)
            if requirement.extras and name in by_name:
                asked.append((by_name[name], frozenset(requirement.extras)))
            if name not in covered:
                needed.setdefault(name, f"{name}{requirement.specifier}")
    return needed


def fetch(folder: Path = WHEELS, roots: tuple[str, ...] = ROOTS) -> list[Path]:
    """Download `roots` and, round after round, every unmet requirement of what is there (here, with
    the package index reachable); returns the wheels."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = list(roots)
    while wanted:
        for requirement in wanted:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp",
                            *(f"--platform={p}" for p in PLATFORMS), "-d", str(folder), requirement], check=True)
        wanted = sorted(unmet(sorted(folder.glob("*.whl"))).values())
        print(f"{len(list(folder.glob('*.whl')))} wheels; still unmet: {', '.join(wanted) or 'none'}", flush=True)
    return sorted(folder.glob("*.whl"))


@dataclass(frozen=True)
class Piece:
    wheel: str  # the wheel's file name
    index: int  # its place in the wheel
    offset: int
    size: int


def plan(wheels: list[Path], out: Path = CARRY, limit: int = SET_LIMIT) -> list[Path]:
    """Cut `wheels` into pieces of at most `limit` bytes and fill sets of at most `limit` bytes with
    them (largest first, first fit). Writes `out/set-NN/` with the pieces and a manifest each; returns
    the set folders. Every set's manifest lists every wheel's size and SHA-256, so any set can check."""
    pieces: list[Piece] = []
    wheels_facts = {}
    for wheel in sorted(wheels):
        size = wheel.stat().st_size
        wheels_facts[wheel.name] = {"size": size, "sha256": _sha256(wheel)}
        for index, offset in enumerate(range(0, max(size, 1), limit)):
            pieces.append(Piece(wheel.name, index, offset, min(limit, size - offset)))
    sets: list[list[Piece]] = []
    for piece in sorted(pieces, key=lambda p: (-p.size, p.wheel, p.index)):
        for group in sets:
            if sum(p.size for p in group) + piece.size <= limit:
                group.append(piece)
                break
        else:
            sets.append([piece])
    if out.exists():
        for old in out.glob("set-*/*"):
            old.unlink()
    folders = []
    sources = {wheel.name: wheel for wheel in wheels}
    for number, group in enumerate(sets):
        folder = out / f"set-{number:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for piece in group:
            with sources[piece.wheel].open("rb") as source:
                source.seek(piece.offset)
                (folder / f"{piece.wheel}.part{piece.index:03d}").write_bytes(source.read(piece.size))
        manifest = {"sets": len(sets), "set": number, "wheels": wheels_facts,
                    "pieces": [vars(p) for p in group]}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        folders.append(folder)
    return folders


def assemble(carry: Path = CARRY, out: Path = READY) -> list[Path]:
    """Join the pieces in `carry/set-*` into `out`, check each wheel's size and SHA-256; raises naming
    what is missing or damaged (a set not carried yet, a piece cut short)."""
    manifests = [json.loads(m.read_text()) for m in sorted(carry.glob(f"set-*/{MANIFEST}"))]
    if not manifests:
        raise SystemExit(f"no sets under {carry}")
    expected = manifests[0]["sets"]
    present = {m["set"] for m in manifests}
    if present != set(range(expected)):
        raise SystemExit(f"sets missing: {sorted(set(range(expected)) - present)} of {expected}")
    wheels = manifests[0]["wheels"]
    located: dict[str, list[tuple[int, Path]]] = {name: [] for name in wheels}
    for manifest in manifests:
        for piece in manifest["pieces"]:
            path = carry / f"set-{manifest['set']:02d}" / f"{piece['wheel']}.part{piece['index']:03d}"
            located[piece["wheel"]].append((piece["index"], path))
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for name, facts in sorted(wheels.items()):
        target = out / name
        with target.open("wb") as joined:
            for _, path in sorted(located[name]):
                joined.write(path.read_bytes())
        if target.stat().st_size != facts["size"] or _sha256(target) != facts["sha256"]:
            target.unlink()
            raise SystemExit(f"{name}: joined pieces do not match the wheel (size or SHA-256)")
        done.append(target)
    return done


def missing_here() -> list[str]:
    """Requirements of the installed vLLM that this interpreter cannot find (run on the machine after
    installing the wheels), less the deliberate omissions."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    unmet_names = []
    for text in md.requires("vllm") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if normal(requirement.name) in {normal(name) for name in NOT_CARRIED}:
            continue
        try:
            md.version(requirement.name)
        except md.PackageNotFoundError:
            unmet_names.append(str(requirement))
    return unmet_names


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("fetch", "plan", "assemble", "missing"))
    args = parser.parse_args()
    if args.step == "fetch":
        fetch()
    elif args.step == "plan":
        for folder in plan(sorted(WHEELS.glob("*.whl"))):
            size = sum(p.stat().st_size for p in folder.iterdir())
            print(f"{folder.relative_to(ROOT)}: {size / 2**20:.1f} MiB")
    elif args.step == "assemble":
        for wheel in assemble():
            print(wheel.relative_to(ROOT))
    else:
        for line in missing_here():
            print(line)


if __name__ == "__main__":
    main()
