"""The toy autoencoder on fine detail it never trained on: object-pixel MAE (0-255) of encode-decode on
``tests/toyworld/heldout_renders.py``'s renders (their own shapes, colours and pattern code), per pattern.

    python benchmarks/toy_autoencoder.py --model vico/toyworld/model [--model OTHER ...] [--n 32] [--csv FILE]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.toyworld.heldout_renders import FINE_PATTERNS, object_mae  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", required=True, help="a pipeline folder (repeatable)")
    p.add_argument("--n", type=int, default=32, help="renders per pattern (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, help="also write model,pattern,object_mae rows here")
    o = p.parse_args(argv)
    for m in o.model:
        if not (m / "vae" / "config.json").is_file():
            p.error(f"--model {m}: no vae/config.json there (a diffusers pipeline folder is expected)")
    if o.n < 1:
        p.error(f"--n must be at least 1, got {o.n}")
    from diffusers import AutoencoderKL

    rows = {str(m): {name: object_mae(AutoencoderKL.from_pretrained(m, subfolder="vae"), name, o.n, o.seed)
                     for name in FINE_PATTERNS} for m in o.model}
    print("| pattern | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    for name in FINE_PATTERNS:
        print(f"| {name} | " + " | ".join(f"{r[name]:.1f}" for r in rows.values()) + " |")
    if o.csv:
        with o.csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "pattern", "object_mae"])
            w.writerows([m, name, f"{v:.4f}"] for m, r in rows.items() for name, v in r.items())
    return 0


if __name__ == "__main__":
    sys.exit(main())
