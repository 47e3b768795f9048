"""The toy-world personalization benchmark (see vico/toyworld/benchmark.py).

    python benchmarks/toy_personalization.py --model vico/toyworld/model --out toy-bench

Trains every method on every novel concept with its official recipe, a longer
one and the toy world's recipe (and ablations of it on request), samples --samples images per (concept, background), prints a markdown
table for benchmarks/RESULTS.md and writes OUT/benchmark.json (resumable: rows
already there are kept) and, when matplotlib is installed, OUT/benchmark.png
(texture identity against text alignment, one point per method and setting).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vico.toyworld import benchmark  # noqa: E402
from vico.toyworld.demo import CONCEPTS  # noqa: E402


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in benchmark.METHODS:
        for setting, marker in zip(benchmark.SETTINGS, itertools.cycle("osD^vP*Xhp")):
            pts = [r for r in rows if r["method"] == method and r["setting"] == setting]
            if not pts:
                continue
            x = sum(r["text_background"] for r in pts) / len(pts)
            y = sum(r["identity_texture"] for r in pts) / len(pts)
            ax.scatter(x, y, marker=marker, s=60)
            ax.annotate(f"{method} ({setting})", (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("text alignment (background read back), mean over concepts")
    ax.set_ylabel("identity: concept texture read back")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("toy-bench"))
    p.add_argument("--samples", type=int, default=8, help="images per (concept, background)")
    p.add_argument("--methods", nargs="+", default=list(benchmark.METHODS), choices=benchmark.METHODS)
    p.add_argument("--settings", nargs="+", default=["default", "long", "toy"], choices=list(benchmark.SETTINGS),
                   metavar="SETTING",
                   help=f"of: {'; '.join(repr(k) for k in benchmark.SETTINGS)} (default: 'default' = the official "
                   f"recipe, 'long' = {benchmark.LONG_FACTOR}x its steps, 'toy' = the demo's recipe; the 'toy, ...' "
                   "ones are ablations of it (ViCo's; AttnDreamBooth's LoRA), quote them)")
    p.add_argument("--concepts", type=int, default=len(CONCEPTS), help=f"the first N of {len(CONCEPTS)} concepts")
    p.add_argument("--concept-index", type=int, nargs="+", choices=range(len(CONCEPTS)), metavar="I",
                   help=f"these concepts instead (indices into demo.CONCEPTS, 0..{len(CONCEPTS) - 1})")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    o = p.parse_args(argv)
    concepts = [CONCEPTS[i] for i in o.concept_index] if o.concept_index else CONCEPTS[:o.concepts]
    rows = benchmark.run(o.model, o.out, concepts=concepts, methods=o.methods, settings=o.settings,
                         samples=o.samples, sample_steps=o.sample_steps, guidance=o.guidance, quiet=False)
    print(benchmark.table(rows))
    if plot(rows, o.out / "benchmark.png"):
        print(f"plot: {o.out / 'benchmark.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
