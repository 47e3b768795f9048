"""The toy-world personalization benchmark (see vico/toyworld/benchmark.py).

    python benchmarks/toy_personalization.py --model toy-sd/pipeline --out toy-bench --steps 200

Prints a markdown table for benchmarks/RESULTS.md and writes toy-bench/benchmark.json
(and toy-bench/benchmark.png when matplotlib is installed: identity vs text alignment).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vico.toyworld import benchmark  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("toy-bench"))
    p.add_argument("--steps", type=int, default=200, help="training steps per method (per stage for AttnDreamBooth)")
    p.add_argument("--samples", type=int, default=4, help="images per background")
    p.add_argument("--methods", nargs="+", default=list(benchmark.METHODS))
    o = p.parse_args(argv)
    rows = benchmark.run(o.model, o.out, steps=o.steps, samples=o.samples, methods=o.methods)
    print(benchmark.table(rows))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in rows:
        ax.scatter(r["text_background"], (r["identity_shape"] + r["identity_colour"]) / 2)
        ax.annotate(r["method"], (r["text_background"], (r["identity_shape"] + r["identity_colour"]) / 2))
    ax.set_xlabel("text alignment (background right)")
    ax.set_ylabel("identity (shape and colour right)")
    fig.tight_layout()
    fig.savefig(o.out / "benchmark.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
