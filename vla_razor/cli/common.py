"""Pieces every training CLI shares."""
from __future__ import annotations


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
