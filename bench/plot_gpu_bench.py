"""Rebuild the derived numbers, the Markdown summary and the PNG plots of ``poslsh bench`` from a
saved JSON (by default the committed bench/results/gpu_bench.json), on any machine.

The JSON's environment (date, device, versions, command) and its measured rows are kept as they
are; only the derived fields (speedups, floors, log-log slopes, targets) are recomputed from the rows.

    python bench/plot_gpu_bench.py [path/to/gpu_bench.json] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poslsh.experiments import gpu_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="?", default=str(Path(__file__).parent / "results" / "gpu_bench.json"))
    p.add_argument("--out", default=None, help="folder for the PNGs and summary (default: the JSON's folder)")
    p.add_argument("--write-json", action="store_true", help="store the recomputed derived fields in the JSON")
    args = p.parse_args(argv)
    path = Path(args.json)
    doc = json.loads(path.read_text())
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    cfg_fields = {f for f in gpu_bench.Config.__dataclass_fields__}
    cfg = gpu_bench.Config(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in doc["config"].items() if k in cfg_fields})
    gpu_bench._derive(doc["results"], cfg)
    gpu_bench.make_plots(doc["results"], out)
    summary = gpu_bench.summarize(doc, out)
    (out / "gpu_bench.md").write_text(summary + "\n")
    if args.write_json:
        path.write_text(json.dumps(doc, indent=1) + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
