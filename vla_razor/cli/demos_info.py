"""`demos-info DATASET`: print what a collect-demos dataset holds (validates every shard).

Exit status 0 for a readable dataset, 2 for a folder that is not one (missing, foreign, corrupt).
"""

from __future__ import annotations

import argparse
import json
import sys

from data_collection.dataset import DatasetError, DemoDataset


def format_summary(summary: dict) -> str:
    lines = [
        f"dataset      {summary['root']}",
        f"task         {summary['task']} ({summary['instruction']!r}), images {summary['image_size']}px",
        f"grid         {summary['grid']}: {summary['cells_done']}/{summary['cells_total']} cells collected"
        + ("" if summary["complete"] else " (incomplete: rerun collect-demos to resume)"),
        f"episodes     {summary['episodes']} kept of {summary['attempts']} attempts "
        f"(expert success {summary['success_rate']:.1%}), min {summary['min_per_cell']} per cell "
        f"(target {summary['per_cell_target']})",
        f"steps        {summary['steps']}",
    ]
    if summary["episode_length"]:
        lo, mean, hi = summary["episode_length"]
        lines.append(f"length       min {lo}, mean {mean:.1f}, max {hi} steps")
    for key, (dtype, shape) in summary["step_fields"].items():
        lines.append(f"  {key:<22} {dtype:<8} [T, {', '.join(map(str, shape))}]" if shape else
                     f"  {key:<22} {dtype:<8} [T]")
    lines.append(f"disk         {summary['disk_bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demos-info", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="folder written by collect-demos")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        summary = DemoDataset(args.dataset).summary()
    except DatasetError as err:
        print(f"demos-info: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
