"""Pieces every training CLI shares."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from data_collection.dataset import DatasetError
from envs.vulkan import VulkanUnavailableError
from vla_razor.checkpoint import CheckpointError

if not OmegaConf.has_resolver("dirname"):  # configs put outputs beside a given file: ${dirname:${base}}/...
    OmegaConf.register_new_resolver("dirname", lambda path: str(Path(path).parent))

# What a user can fix (a bad value; a missing file, package, checkpoint or Vulkan device; a foreign or corrupt
# demos folder): one line, never a traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError, CheckpointError,
               MissingMandatoryValue, DatasetError, VulkanUnavailableError)


def run_config(program: str, job: Callable[[Any], Any], cfg) -> Any:
    """``job(config object)`` for a Hydra entry point; a user error exits with ``<program>: error: <message>``
    (Hydra would print a traceback)."""
    try:
        return job(OmegaConf.to_object(cfg))
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise SystemExit(f"{program}: error: {message}") from None


def translate_algo_flag(argv: list[str], program: str = "train", choices: str = "see the algo/ config group") -> list[str]:
    """``--algo X`` / ``--algo=X`` -> Hydra's ``algo=X`` (the documented spelling of the training commands)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--algo":
            if i + 1 == len(argv):
                raise SystemExit(f"{program}: --algo needs a value: {choices}")
            out.append(f"algo={argv[i + 1]}")
            i += 2
            continue
        out.append("algo=" + arg[len("--algo="):] if arg.startswith("--algo=") else arg)
        i += 1
    return out


def reject_unknown_algo(argv: list[str], program: str, algo_dir: str | Path) -> None:
    """Exit with one line naming the known algos when ``algo=X`` (after :func:`translate_algo_flag`) has no
    ``<algo_dir>/X.yaml`` -- Hydra's own error spreads the same news over a dozen lines."""
    known = sorted(path.stem for path in Path(algo_dir).glob("*.yaml"))
    for arg in argv[1:]:
        if arg.startswith("algo="):
            for name in arg[len("algo="):].split(","):  # a -m sweep lists several; other sweep syntax goes to Hydra
                if name.isidentifier() and name not in known:
                    raise SystemExit(f"{program}: unknown algo {name!r}; use --algo {' | '.join(known)}")
