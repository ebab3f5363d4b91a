"""Pieces every training CLI shares."""
from __future__ import annotations

from pathlib import Path


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
