"""Regenerate the README's results section from the committed JSON in bench/results/.

    python3 -m poslsh.readme            # rewrite README.md between the generated markers
    python3 -m poslsh.readme --check    # exit 1 if README.md is out of date (a test runs this)

Numbers in the README come only from here, so they cannot drift from the measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from .experiments.common import fmt, markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- generated:start -->", "<!-- generated:end -->"


def _provenance(doc: dict[str, Any], path: Path) -> str:
    env = doc["environment"]
    where = env.get("device", "?")
    return (f"<sub>From [`{path.relative_to(ROOT)}`]({path.relative_to(ROOT)}): {env['date'][:10]}, {where}, "
            f"torch {env['torch']}, triton {env.get('triton')}, command `{env['command']}`.</sub>")


def _cpu_scaling(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    small, large = cfg["lengths"]
    rows = []
    for run in doc["results"]["runs"]:
        rows.append([run["backend"], run["scheme"], fmt(run["cpu_seconds"][str(small)]), fmt(run["cpu_seconds"][str(large)]),
                     fmt(run["ratio"]), fmt(run["wall_ratio"]), f"{run['peak_rss_bytes'] / 2**20:.0f} MiB"])
    head = (f"### CPU scaling (issue target: time ratio ≤ 12, peak memory < 2 GB)\n\n"
            f"LSH forward, H = {cfg['heads']}, D = {cfg['head_dim']}, {cfg['dtype']}, r = {cfg['samples']}, causal, "
            f"{cfg['threads']} torch thread; CPU seconds, best of {cfg['repeats']} (linear growth is 8×, quadratic 64×).\n")
    table = markdown_table(["backend", "scheme", f"n={small} (s)", f"n={large} (s)", "CPU-time ratio",
                            "wall-time ratio", f"peak RSS at {large}"], rows)
    return head + "\n" + table


# (file in bench/results, renderer); a block whose file is absent is left out.
SECTIONS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("cpu_scaling.json", _cpu_scaling),
]


def _extra_sections() -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    """Experiments that render their own README block: ``readme_section(doc) -> str``."""
    import importlib

    found = []
    for module, filenames in (("gpu_bench", ("gpu_bench/gpu_bench.json",)),
                              ("lm_validation", ("lm-validation.json",)),
                              ("pareto", ("pareto_h200_256k/pareto.json", "pareto_h200/pareto.json",
                                          "pareto_h200_heavy/pareto.json", "pareto_cpu/pareto.json"))):
        try:
            mod = importlib.import_module(f"poslsh.experiments.{module}")
        except ModuleNotFoundError:
            continue
        if hasattr(mod, "readme_section"):
            found += [(filename, mod.readme_section) for filename in filenames]
    return found


TITLES = {
    "gpu_bench/gpu_bench.json": "GPU: every method on its backends, forward, forward + backward and decoding",
    "lm-validation.json": "Language-model validation (H200): an ALiBi LM trained here, perplexity per method, r "
                          "and context",
    "pareto_h200_256k/pareto.json": "Beyond the paper on the GPU: accuracy vs time at n = 256K (H200)",
    "pareto_h200/pareto.json": "Beyond the paper on the GPU: accuracy vs time at n = 64K (H200; this run's 256K "
                               "panel spent its time budget on the float32 reference of every row and was rerun "
                               "above on the last 8192 rows)",
    "pareto_h200_heavy/pareto.json": "Beyond the paper on the GPU: a heavy-tailed kernel at n = 64K (H200; this "
                                     "run's ALiBi panel failed on a block-mask size bug, fixed and rerun above)",
    "pareto_cpu/pareto.json": "Beyond the paper: correlated sampling, hybrid, heavy-tailed kernels (CPU)",
}


def render() -> str:
    parts = []
    for filename, renderer in _extra_sections() + SECTIONS:
        path = RESULTS / filename
        if path.exists():
            doc = json.loads(path.read_text())
            title = f"### {TITLES[filename]}\n\n" if filename in TITLES else ""
            parts.append(title + renderer(doc) + "\n\n" + _provenance(doc, path))
    return "\n\n".join(parts)


def updated(readme: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = p.parse_args(argv)
    path = ROOT / "README.md"
    current = path.read_text()
    new = updated(current)
    if args.check:
        if new != current:
            print("README.md is out of date: run python3 -m poslsh.readme", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
