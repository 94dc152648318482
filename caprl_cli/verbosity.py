"""How much caprl, and the libraries under it, print: `-q`, the default, `-v`, `-vv`.

caprl's own lines go through the `caprl` logger (`caprl: ...` on stderr): `-q` shows only its warnings
and errors, the default its progress and summary, `-v` its debug lines. What the engine libraries print
at start-up (vLLM's and torch's Python loggers, torch's C++ warnings such as NUMA binding, transformers'
logger, Python `warnings` from any of them) is held back to errors unless `-vv`. It is silenced by
level, never by closing stderr: an error any library reports still shows, and so does every line of
caprl's own.

Each switch is also put in the environment, because the libraries read it there and because engine
worker processes (and vLLM's own engine-core process, when it has one) start from a fresh interpreter:
`apply_in_child` repeats the in-process part there. A variable the user set is left as it is.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from caprl_cli.stdio import PipeSafeHandler

# Carries -q/-v to engine worker processes: -1 quiet, 0 default, 1 -v, 2 -vv.
VERBOSITY_ENV = "CAPRL_VERBOSITY"
ALL_LOGS = 2  # -vv: the libraries' own logs too
# Python loggers of the libraries an engine brings in; vLLM's is configured by vLLM itself only once an
# engine starts, so what it logs while being imported would otherwise reach Python's last-resort
# handler, which prints every warning.
LIBRARY_LOGGERS = ("vllm", "torch", "transformers", "triton", "huggingface_hub", "accelerate", "filelock", "PIL")


def level_of(quiet: bool, verbose: int) -> int:
    """-q/-v as one number: -1 quiet, 0 default, 1 -v, 2 or more -vv."""
    return -1 if quiet else verbose


def library_environment(verbosity: int) -> dict[str, str]:
    """The environment switches that set the libraries' own levels."""
    if verbosity >= ALL_LOGS:
        return {
            "VLLM_LOGGING_LEVEL": "DEBUG" if verbosity > ALL_LOGS else "INFO",
            "TRANSFORMERS_VERBOSITY": "info",
            "TOKENIZERS_PARALLELISM": "false",
        }
    return {
        "VLLM_LOGGING_LEVEL": "ERROR",
        "TRANSFORMERS_VERBOSITY": "error",
        # torch's Python loggers: torch sets its own level when imported, from TORCH_LOGS ("-torch": ERROR).
        "TORCH_LOGS": "-torch",
        # torch's C++ log (TORCH_WARN: "Warning: NUMA binding ..."), read when torch is first imported.
        "TORCH_CPP_LOG_LEVEL": "ERROR",
        "TOKENIZERS_PARALLELISM": "false",
    }


def configure(verbosity: int) -> None:
    """Set caprl's own logger and the libraries' levels for this process and the ones it starts."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = PipeSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("caprl: %(message)s"))
    own = logging.getLogger("caprl")
    own.handlers[:] = [handler]
    own.setLevel(level)
    own.propagate = False
    os.environ[VERBOSITY_ENV] = str(verbosity)
    for name, value in library_environment(verbosity).items():
        os.environ.setdefault(name, value)
    quiet_libraries(verbosity)


def apply_in_child() -> None:
    """In an engine worker process: the verbosity its parent was given (it is in the environment)."""
    try:
        verbosity = int(os.environ.get(VERBOSITY_ENV, "0"))
    except ValueError:
        verbosity = 0
    configure(verbosity)


def quiet_libraries(verbosity: int) -> None:
    """Below -vv: the libraries' Python loggers at ERROR and their Python warnings ignored (caprl's
    own warnings, if it ever raises one, still show)."""
    if verbosity >= ALL_LOGS:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"caprl_cli(\.|$)")
