"""On-disk demonstration datasets: TensorDict memmap shards plus one `metadata.json`.

Layout of a dataset folder::

    metadata.json            format name + version, task, grid, tokenizer spec, per-cell counts
    shards/cell_0007/        one TensorDict memmap per grid cell (all of that cell's kept episodes)
    videos/*.mp4             optional, written by `collect-demos video=true`

A shard holds ``steps`` (batch [N] over all steps of its episodes, in episode order)::

    ("observation", "image")  uint8   [N, H, W, 3]   image seen before the step's action
    ("observation", "state")  float32 [N, D]         envs.state_layout(task): 19 embedded, 18 SimplerEnv
    "action"                  float32 [N, 7]         the expert's env action (metadata "action" says which)
    ("vla_action", "tokens")  int64   [N, 7]         window ids in [0, 256) of the policy action (metadata "tokens")
    "episode"                 int64   [N]            row of the episode in this shard's `episodes`
    "step"                    int64   [N]            time index within the episode

and ``episodes`` (batch [E]): cell, x, y, seed, attempt, success, length, start (first row in
`steps`); plus scalars ``cell`` and ``attempts`` (kept and filtered episodes of the cell).

A shard is written to a hidden temporary folder and renamed into place (`os.replace`), so after a
crash it is either complete or absent; a collection resumes by collecting the cells with no shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict

FORMAT = "vla-razor-demos"
VERSION = 1
METADATA = "metadata.json"
SHARDS = "shards"
TMP_PREFIX = ".tmp-"

STEP_KEYS = (("observation", "image"), ("observation", "state"), "action", ("vla_action", "tokens"),
             "episode", "step")
EPISODE_KEYS = ("cell", "x", "y", "seed", "attempt", "success", "length", "start")


class DatasetError(RuntimeError):
    """A folder that is not a readable vla-razor demos dataset (missing, foreign, corrupt, mismatched)."""


@dataclass
class Episode:
    """One recorded episode: T steps of observation-before-action and the action taken."""

    cell: int
    x: float
    y: float
    seed: int
    attempt: int
    success: bool
    images: torch.Tensor  # uint8 [T, H, W, 3]
    states: torch.Tensor  # float32 [T, D] (the task's state layout)
    actions: torch.Tensor  # float32 [T, 7]
    tokens: torch.Tensor  # int64 [T, 7]

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


def shard_name(cell: int) -> str:
    return f"cell_{cell:04d}"


def build_shard(cell: int, episodes: list[Episode], attempts: int) -> TensorDict:
    """The episodes of one cell as a shard TensorDict (see module docstring); checks shapes."""
    for ep in episodes:
        t = ep.length
        shapes = {"images": ep.images.shape[:1], "states": ep.states.shape[:1], "tokens": ep.tokens.shape[:1]}
        if any(s != (t,) for s in shapes.values()) or ep.actions.shape[1:] != ep.tokens.shape[1:]:
            raise ValueError(f"episode seed={ep.seed}: actions {tuple(ep.actions.shape)} disagree with "
                             f"images {tuple(ep.images.shape)}, states {tuple(ep.states.shape)}, "
                             f"tokens {tuple(ep.tokens.shape)}")
        if ep.cell != cell:
            raise ValueError(f"episode seed={ep.seed} belongs to cell {ep.cell}, not to shard cell {cell}")
    lengths = torch.tensor([ep.length for ep in episodes], dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    n = int(lengths.sum())
    if episodes:
        cat = lambda name: torch.cat([getattr(ep, name) for ep in episodes])  # noqa: E731
        steps = {("observation", "image"): cat("images"), ("observation", "state"): cat("states"),
                 "action": cat("actions"), ("vla_action", "tokens"): cat("tokens")}
    else:
        steps = {}
    steps["episode"] = torch.repeat_interleave(torch.arange(len(episodes)), lengths)
    steps["step"] = torch.cat([torch.arange(ep.length) for ep in episodes]) if episodes else torch.zeros(0, dtype=torch.int64)
    eps = {
        "cell": torch.full((len(episodes),), cell, dtype=torch.int64),
        "x": torch.tensor([ep.x for ep in episodes], dtype=torch.float64),
        "y": torch.tensor([ep.y for ep in episodes], dtype=torch.float64),
        "seed": torch.tensor([ep.seed for ep in episodes], dtype=torch.int64),
        "attempt": torch.tensor([ep.attempt for ep in episodes], dtype=torch.int64),
        "success": torch.tensor([ep.success for ep in episodes], dtype=torch.bool),
        "length": lengths,
        "start": starts,
    }
    return TensorDict({
        "steps": TensorDict(steps, batch_size=[n]),
        "episodes": TensorDict(eps, batch_size=[len(episodes)]),
        "cell": torch.tensor(cell),
        "attempts": torch.tensor(attempts),
    }, batch_size=[])


def write_shard(root: Path, cell: int, episodes: list[Episode], attempts: int) -> Path:
    """Write one cell's shard atomically: memmap into a temporary folder, then rename into place."""
    root = Path(root)
    final = root / SHARDS / shard_name(cell)
    if final.exists():
        raise FileExistsError(f"shard {final} already exists; a cell is collected once (delete it to recollect)")
    tmp = root / SHARDS / f"{TMP_PREFIX}{shard_name(cell)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    build_shard(cell, episodes, attempts).memmap_(tmp, num_threads=0)
    _fsync_tree(tmp)
    os.replace(tmp, final)
    return final


def _fsync_tree(folder: Path) -> None:
    # Flush file contents before the rename publishes the shard; otherwise a power loss could leave a
    # complete-looking folder of partly written files.
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def remove_partial_shards(root: Path) -> int:
    """Delete temporary shard folders left by a killed collection; returns how many."""
    shards = Path(root) / SHARDS
    stale = [p for p in shards.glob(f"{TMP_PREFIX}*")] if shards.exists() else []
    for path in stale:
        shutil.rmtree(path)
    return len(stale)


def write_metadata(root: Path, metadata: dict) -> None:
    """Atomically (re)write `metadata.json`; stamps the format name and version."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{METADATA}-{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **metadata}, indent=2))
    os.replace(tmp, root / METADATA)


def read_metadata(root: Path) -> dict:
    """`metadata.json` of a dataset folder; DatasetError if absent, unreadable or of another format."""
    path = Path(root) / METADATA
    if not path.exists():
        raise DatasetError(f"{root} is not a vla-razor demos dataset: {METADATA} not found "
                           f"(collect one with `collect-demos out_dir={root}`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path} is not valid JSON ({err}); the dataset is corrupt") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{root} is not a vla-razor demos dataset: {METADATA} has format {found!r}, "
                           f"expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise DatasetError(f"{root} has dataset version {meta.get('version')!r}; this code reads version {VERSION}")
    return meta


def shard_cells(root: Path) -> list[int]:
    """Cells whose shard is present (complete) on disk, sorted."""
    shards = Path(root) / SHARDS
    if not shards.exists():
        return []
    cells = []
    for path in shards.iterdir():
        if path.name.startswith("cell_") and path.is_dir():
            try:
                cells.append(int(path.name[len("cell_"):]))
            except ValueError:
                raise DatasetError(f"unexpected shard folder {path}; shard names are cell_<index>") from None
    return sorted(cells)


def load_shard(root: Path, cell: int) -> TensorDict:
    """One cell's shard (memory-mapped), validated; DatasetError naming the shard if it is corrupt."""
    path = Path(root) / SHARDS / shard_name(cell)
    try:
        # load_memmap silently zero-extends a truncated .memmap file, so sizes are taken beforehand; keyed by
        # resolved path, as the tensors name their files absolutely (the folder may be given relative or via a link)
        sizes = {str(p.resolve()): p.stat().st_size for p in path.rglob("*.memmap")}
        td = TensorDict.load_memmap(path)
        for key, tensor in td.items(include_nested=True, leaves_only=True):
            expected = tensor.numel() * tensor.element_size()
            if expected == 0:  # empty tensors are stored without a file
                continue
            held = sizes.get(str(Path(tensor.filename).resolve()))
            if held != expected:
                raise ValueError(f"{_key_name(key)}: file {tensor.filename} held {held} bytes, its shape needs "
                                 f"{expected}")
        steps, eps = td["steps"], td["episodes"]
        # A cell whose every attempt failed has a shard with no episodes (and no per-step fields).
        for key in STEP_KEYS if eps.batch_size[0] else ("episode", "step"):
            steps.get(key)
        for key in EPISODE_KEYS:
            eps.get(key)
        lengths = eps["length"]
        consistent = (int(td["cell"]) == cell and int(lengths.sum()) == steps.batch_size[0]
                      and bool((eps["cell"] == cell).all()) and int(td["attempts"]) >= eps.batch_size[0])
    except Exception as err:  # noqa: BLE001 - any failure to read a shard means the same thing to the user
        raise DatasetError(f"shard {path} is corrupt or not a vla-razor shard ({type(err).__name__}: {err}); "
                           f"delete that folder and rerun collect-demos on the same out_dir to recollect it") from err
    if not consistent:
        raise DatasetError(f"shard {path} is inconsistent (cell {int(td['cell'])}, {int(lengths.sum())} steps by "
                           f"episode lengths vs {steps.batch_size[0]} rows); delete it and rerun collect-demos")
    return td


class DemoDataset:
    """Read access to a dataset folder: metadata, shards, episodes, a summary."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root} does not exist or is not a folder")
        self.metadata = read_metadata(self.root)
        self.cells = shard_cells(self.root)
        n_cells = len(self.metadata["grid"]["positions"])
        bad = [c for c in self.cells if not 0 <= c < n_cells]
        if bad:
            raise DatasetError(f"{self.root}: shards for cells {bad} outside the grid of {n_cells} cells")

    def shard(self, cell: int) -> TensorDict:
        return load_shard(self.root, cell)

    def episodes(self) -> Iterator[tuple[dict, TensorDict]]:
        """(per-episode scalars, steps TensorDict [T]) for every kept episode, in cell order."""
        for cell in self.cells:
            td = self.shard(cell)
            eps = td["episodes"]
            for i in range(eps.batch_size[0]):
                row = {k: eps[k][i].item() for k in EPISODE_KEYS}
                yield row, td["steps"][row["start"]:row["start"] + row["length"]]

    def episode_keys(self) -> list[tuple[int, int]]:
        """(cell, seed) of every kept episode; an episode's identity for resume checks."""
        keys = []
        for cell in self.cells:
            eps = self.shard(cell)["episodes"]
            keys += [(cell, int(s)) for s in eps["seed"]]
        return keys

    def summary(self) -> dict:
        """Counts and shapes of what the folder holds (reads every shard, so it also validates them)."""
        n_cells = len(self.metadata["grid"]["positions"])
        episodes = steps = attempts = 0
        per_cell = {}
        lengths = []
        shapes = {}
        for cell in self.cells:
            td = self.shard(cell)
            n = td["episodes"].batch_size[0]
            per_cell[cell] = n
            episodes += n
            steps += td["steps"].batch_size[0]
            attempts += int(td["attempts"])
            lengths += td["episodes"]["length"].tolist()
            if not shapes and n:
                shapes = {_key_name(k): (str(td["steps"][k].dtype).replace("torch.", ""), list(td["steps"][k].shape[1:]))
                          for k in STEP_KEYS}
        disk = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return {
            "root": str(self.root),
            "task": self.metadata["task"],
            "instruction": self.metadata["instruction"],
            "image_size": self.metadata["image_size"],
            "grid": f"{self.metadata['grid']['n_x']}x{self.metadata['grid']['n_y']}",
            "cells_done": len(self.cells),
            "cells_total": n_cells,
            "complete": len(self.cells) == n_cells,
            "episodes": episodes,
            "attempts": attempts,
            "success_rate": episodes / attempts if attempts else float("nan"),
            "steps": steps,
            "episode_length": (min(lengths), sum(lengths) / len(lengths), max(lengths)) if lengths else None,
            "min_per_cell": min(per_cell.values()) if per_cell else 0,
            "per_cell_target": self.metadata["per_cell"],
            "step_fields": shapes,
            "disk_bytes": disk,
        }


def _key_name(key) -> str:
    return ".".join(key) if isinstance(key, tuple) else key
