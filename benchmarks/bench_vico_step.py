"""ViCo training and sampling step time (and peak memory) with the fused
processor vs the `paper` and `diffusers+maps` baselines (docs/shapes.md §4).

    python benchmarks/bench_vico_step.py --model tiny            # tiny pipeline, latent 16x16
    python benchmarks/bench_vico_step.py --model sd15 --latent 32 # SD 1.5-sized UNet, random weights

Each processor runs in its own subprocess so peak memory (ru_maxrss on CPU,
max_memory_allocated on CUDA) is its own. Training step = forward + backward
of the ViCo loss (noisy + reference halves, batch 1); sampling step = one
guided UNet call (4 rows: noisy/reference x uncond/cond).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fused.benchmark import DTYPES  # noqa: E402


def build_components(model: str, device: str, dtype: torch.dtype = torch.float32):
    from vico import tiny
    from vico.model import Components

    comps = tiny.make_tiny_components()
    if model == "sd15":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = json.loads((ROOT / "vico" / "configs" / "sd15_unet.json").read_text())
        comps["unet"] = UNet2DConditionModel.from_config(cfg)
        tok = comps["tokenizer"]
        comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    c = Components(path=f"<{model}>", **comps)
    for m in (c.unet, c.text_encoder, c.vae):
        m.requires_grad_(False).eval()
    return c.to(device, dtype)


def run_one(processor: str, model: str, latent: int, repeat: int, device: str, dtype: torch.dtype) -> dict:
    import fused
    from benchmarks.baselines import BASELINES
    from vico.methods.base import MethodConfig
    from vico.methods.vico import ViCo

    torch.manual_seed(0)
    comps = build_components(model, device, dtype)
    method = ViCo(comps, MethodConfig(init_word="cat", resolution=latent * 2))
    fused.attach(comps.unet, BASELINES[processor])
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, latent, latent, generator=g).to(device, dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train_step():
        batch = method.make_batch(mean, torch.zeros_like(mean), g, batch_size=1)
        loss, _ = method.training_loss(batch, g)
        loss.backward()
        sync()

    ids, cond = __import__("vico.model", fromlist=["encode_prompts"]).encode_prompts(
        comps.tokenizer, comps.text_encoder, ["a photo of S*"])
    uncond = comps.text_encoder(comps.tokenizer([""], padding="max_length", max_length=77,
                                                return_tensors="pt").input_ids.to(device))[0]
    context = method.sampling_context(mean[:1], 1)

    @torch.no_grad()
    def sample_step():
        method.predict_noise(mean[:1], torch.tensor(500, device=device), ids, cond.detach(), uncond, 7.5, context)
        sync()

    def best(fn):
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_ms = best(train_step)
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    sample_ms = best(sample_step)
    peak = train_peak if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(processor=processor, model=model, latent=latent, device=device, dtype=str(dtype)[6:], train_ms=train_ms,
                sample_ms=sample_ms, peak_mb=peak, threads=torch.get_num_threads())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--latent", type=int, default=16, help="latent side (16 tiny; 32 or 64 for sd15)")
    p.add_argument("--repeat", type=int, default=5, help="best of N")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print only JSON")
    opts = p.parse_args(argv)
    opts.dtype = opts.dtype or ("fp16" if opts.device == "cuda" else "fp32")
    dtype = DTYPES[opts.dtype]
    if opts.one:
        print(json.dumps(run_one(opts.one, opts.model, opts.latent, opts.repeat, opts.device, dtype)))
        return 0
    rows = []
    for name in ("fused", "paper", "diffusers+maps"):
        cmd = [sys.executable, __file__, "--one", name, "--model", opts.model, "--latent", str(opts.latent),
               "--repeat", str(opts.repeat), "--device", opts.device, "--dtype", opts.dtype]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    fused_row = rows[0]
    for r in rows:
        r["train_speedup_of_fused"] = r["train_ms"] / fused_row["train_ms"]
        r["sample_speedup_of_fused"] = r["sample_ms"] / fused_row["sample_ms"]
    if opts.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"ViCo step, {opts.model} UNet, latent {opts.latent}x{opts.latent}, {opts.device} {opts.dtype}, "
          f"torch {torch.__version__}, {rows[0]['threads']} threads, best of {opts.repeat}")
    print("| processor | train step ms | sample step ms | peak MB | fused speed-up (train) | fused speed-up (sample) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processor']} | {r['train_ms']:.1f} | {r['sample_ms']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['train_speedup_of_fused']:.2f}x | {r['sample_speedup_of_fused']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
