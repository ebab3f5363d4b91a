"""Wall time of the full ParityMNIST study (issue target: <= 20 minutes on 2 CPU cores).

    python benchmarks/parity_mnist_study.py --data-root ../shared/data [--out runs/bench_parity] [overrides ...]

Runs `parity-mnist` in a fresh folder and prints wall time, points per method and the run's headline numbers.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from vla_razor.results import read_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default="runs/bench_parity")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. experiment=parity_quick")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    exe = shutil.which("parity-mnist") or sys.exit("parity-mnist is not installed: run `bash scripts/setup.sh`")
    started = time.time()
    subprocess.run([exe, f"data_root={args.data_root}", f"out_dir={out}", *args.overrides], check=True)
    wall = time.time() - started
    rows = read_rows(out / "results.csv")
    print(f"wall time: {wall:.1f} s ({wall / 60:.1f} min) for {len(rows)} evaluated checkpoints")
    for method, count in sorted(Counter(r["method"] for r in rows).items()):
        print(f"  {method:14s} {count} points")
    print((out / "report" / "summary.md").read_text())


if __name__ == "__main__":
    main()
