"""What `vico train`'s latent cache saves: encoding the training images with an SD-sized VAE (random weights)
against reading them from the run's ``latents.safetensors``, and what encoding one batch every step costs (how
diffusers' textual_inversion.py and kohya's scripts without --cache_latents train).

    python benchmarks/bench_latent_cache.py --size 512 --images 5 --batch 1 --repeat 3 --threads 2

Prints a table and CSV lines (``--csv FILE`` writes them), medians of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
TINY_VAE = dict(SD15_VAE, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1)


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(size: int, images: int, batch: int, repeat: int, tiny: bool = False) -> dict[str, float]:
    """Seconds: ``encode_all`` (the run's images, once), ``read_cache`` (the same from disk) and
    ``encode_batch`` (one step's batch, what a trainer without the cache pays every step)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE)).eval().requires_grad_(False)
    pixels = torch.rand(images, 3, size, size) * 2 - 1

    def encode(x):
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            return posterior.mean * vae.config.scaling_factor, posterior.std * vae.config.scaling_factor

    mean, std = encode(pixels)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latents.safetensors"
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(path))
        read = median_seconds(lambda: load_file(str(path)), repeat)
    return dict(encode_all=median_seconds(lambda: encode(pixels), repeat), read_cache=read,
                encode_batch=median_seconds(lambda: encode(pixels[:batch]), repeat))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--images", type=int, default=5, help="training images (default 5)")
    p.add_argument("--batch", type=int, default=1, help="batch of one training step (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="a tiny VAE (a smoke test of this script)")
    p.add_argument("--csv", type=Path, help="also write the CSV lines to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = measure(a.size, a.images, a.batch, a.repeat, a.tiny)
    vae = "tiny" if a.tiny else "SD 1.5-sized"
    print(f"{vae} VAE, {a.images} images of {a.size}², batch {a.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {a.repeat}")
    print("| what | seconds |\n|---|---|")
    print(f"| encode the {a.images} training images (a run without the cache, again at every resume) | "
          f"{r['encode_all']:.3f} |")
    print(f"| read them from latents.safetensors (a resumed run) | {r['read_cache']:.4f} |")
    print(f"| encode one batch of {a.batch} (every step, without cached latents) | {r['encode_batch']:.3f} |")
    lines = ["what,seconds,size,images,batch,threads"] + [
        f"{k},{v:.6f},{a.size},{a.images},{a.batch},{torch.get_num_threads()}" for k, v in r.items()]
    print("\n".join(lines))
    if a.csv:
        a.csv.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
