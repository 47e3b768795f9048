"""ViCo's training step and sampling step, time and peak memory: the fused path
against the `diffusers+maps`, `paper` and `official` baselines (fused/benchmark/baselines.py,
docs/shapes.md §4), at one or more latent sizes, with ratios to the fused path.

    python benchmarks/bench_vico_step.py --model tiny --latent 16 --repeat 1          # a quick check
    python benchmarks/bench_vico_step.py --model sd15 --latent 32 48 64 --threads 2   # CPU: SD 1.5-sized UNet
    python benchmarks/bench_vico_step.py --model sd15 --latent 64 96 128 --device cuda # GPU (fp16)
    python benchmarks/bench_vico_step.py --model sdxl --latent 32 --threads 2 --phases train  # SDXL base-sized

The processors: `fused` (this project: maps, Otsu and the masked image attention
in fused ops, SDPA elsewhere); `diffusers+maps` (SDPA, probabilities materialised
only where maps are recorded, batched Otsu); `paper` (every text cross-attention
and the image attention materialised, Otsu in a per-sample loop); `official`
(every attention layer materialised as the official LDM CrossAttention: fp32
einsum, large-negative fill, per-sample Otsu). All compute the same loss and
gradients (tests/benchmark_scripts/test_baselines.py). The SD 1.5 UNet has random weights
(tests/configs/sd15_unet.json) and a 12-layer CLIP-sized text encoder.

Training step = forward + backward of the ViCo loss (noisy + reference halves,
batch 1); sampling step = one guided UNet call (4 rows: noisy/reference x
uncond/cond). Time: best of --repeat after one warm-up. With the default
--reference-stop fused, only the fused row stops the reference half after the
last flagged layer (vico.image_attention.ReferenceEarlyStop); the baselines run
both halves through the whole decoder, as the official code does (it skips
only the reference's final conv).

Every (processor, latent, step) runs in its own subprocess. Peak memory: on CPU
the process's peak resident set (VmHWM, reset after the warm-up; ru_maxrss where
/proc is missing), `extra` = that peak minus the resident set before the timed
steps (the model and its inputs); on CUDA max_memory_allocated and its rise above
the memory allocated before. On CPU a child whose address space would exceed
--mem-limit-gb stops with "out of memory" instead of endangering the machine;
its row says so. Ratios: baseline time / fused time (fused speed-up) and fused
memory / baseline memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fused  # noqa: E402
from fused.benchmark import DTYPES, PeakMemory, time_ms  # noqa: E402
from fused.benchmark.timing import proc_kb  # noqa: E402

PROCESSORS = ("fused", "diffusers+maps", "paper", "official")
PHASES = ("train", "sample")


def build_components(model: str, device: str, dtype: torch.dtype = torch.float32):
    from tests import builders as tiny
    from vico.model import Components

    configs = ROOT / "tests" / "configs"
    if model == "sdxl":  # SDXL base's UNet (2,567,463,684 parameters), CLIP-L and OpenCLIP-bigG, random weights
        comps = tiny.make_tiny_sdxl_components()
        comps["unet"] = unet_from_config(configs / "sdxl_unet.json")
    else:
        comps = tiny.make_tiny_components()
        if model == "sd15":
            comps["unet"] = unet_from_config(configs / "sd15_unet.json")
    if model in ("sd15", "sdxl"):  # CLIP-L sized
        comps["text_encoder"] = clip_text_encoder(comps["tokenizer"], 768, 12, 12, 3072)
    if model == "sdxl":  # OpenCLIP-bigG sized, with its projection
        comps["text_encoder_2"] = clip_text_encoder(comps["tokenizer_2"], 1280, 32, 20, 5120, projection_dim=1280)
    c = Components(path=f"<{model}>", **comps)
    for m in (c.unet, c.text_encoder, c.text_encoder_2, c.vae):
        if m is not None:
            m.requires_grad_(False).eval()
    return c.to(device, dtype)


def unet_from_config(config: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(json.loads(config.read_text()))


def clip_text_encoder(tok, width: int, layers: int, heads: int, intermediate: int, projection_dim: int | None = None):
    """A CLIP text encoder of the given size on ``tok``'s vocabulary (with a projection when ``projection_dim``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            **({} if projection_dim is None else {"projection_dim": projection_dim}))
    return (CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection)(config)


def limit_memory(gb: float | None) -> None:
    """Cap this process's address space at its current size + ``gb`` (CPU runs only)."""
    size_kb = proc_kb("VmSize")
    if gb is None or gb <= 0 or size_kb is None:
        return
    cap = size_kb * 1024 + int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


def build_steps(processor: str, model: str, latent: int, device: str, dtype: torch.dtype,
                reference_stop: bool | None = None) -> dict:
    """ViCo on ``model`` with ``processor`` installed: {"train": step, "sample": step}, each a
    zero-argument function running one step. ``reference_stop``: whether ViCo stops the
    reference half after the last flagged layer (default: for ``fused`` only)."""
    import fused
    from fused.benchmark import BASELINES
    from vico.methods.base import MethodConfig
    from vico.methods.vico import ViCo
    from vico.model import encode_prompts

    reference_stop = processor == "fused" if reference_stop is None else reference_stop
    torch.manual_seed(0)
    comps = build_components(model, device, dtype)
    method = ViCo(comps, MethodConfig(init_word="cat", resolution=latent * 8 if model in ("sd15", "sdxl") else latent * 2))
    method.reference_stop.enabled = reference_stop
    fused.attach(comps.unet, BASELINES[processor])
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, latent, latent, generator=g).to(device, dtype)
    params = [method.embedding.learned] + list(method.blocks.parameters())

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train_step():
        batch = method.make_batch(mean, torch.zeros_like(mean), g, batch_size=1)
        loss, _ = method.training_loss(batch)
        loss.backward()
        for p in params:  # an optimiser's zero_grad(set_to_none=True): each step allocates its gradients
            p.grad = None
        sync()

    size = method.config.resolution  # SDXL's time ids
    cond = encode_prompts(comps, ["a photo of S*"], size=size).detach()
    uncond = encode_prompts(comps, [""], size=size).detach()
    context = method.sampling_context(mean[:1], 1)

    @torch.no_grad()
    def sample_step():
        method.predict_noise(mean[:1], torch.tensor(500, device=device), cond, uncond, 7.5, context)
        sync()

    return {"train": train_step, "sample": sample_step}


def run_one(processor: str, model: str, latent: int, repeat: int, device: str, dtype: torch.dtype,
            reference_stop: bool | None = None, phases=PHASES) -> dict:
    """Time and peak memory of ``phases`` in this process, one after the other.

    Returns {phase}_ms, {phase}_peak_mb and {phase}_extra_mb per phase (MB as ``PeakMemory``)."""
    reference_stop = processor == "fused" if reference_stop is None else reference_stop
    steps = build_steps(processor, model, latent, device, dtype, reference_stop)
    row = dict(processor=processor, model=model, latent=latent, device=device, dtype=str(dtype)[6:],
               reference_stop=reference_stop, threads=torch.get_num_threads(), repeat=repeat)
    for phase in phases:
        fn = steps[phase]
        fn()  # warm-up: kernels built, allocator primed
        memory = PeakMemory(device).start()
        times = time_ms(fn, device, repeat, warmup=0)
        row[f"{phase}_peak_mb"], row[f"{phase}_extra_mb"] = memory.stop()
        row[f"{phase}_ms"] = min(times)
    return row


def profile(processor: str, model: str, latent: int, phase: str, device: str, dtype: torch.dtype,
            reference_stop: bool | None = None, rows: int = 25) -> str:
    """torch.profiler table (self time, top ``rows`` ops) of one step after a warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = build_steps(processor, model, latent, device, dtype, reference_stop)[phase]
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def child(opts, processor: str, phase: str, latent: int) -> dict:
    cmd = [sys.executable, __file__, "--one", processor, "--phase", phase, "--model", opts.model,
           "--latent", str(latent), "--repeat", str(opts.repeat), "--device", opts.device, "--dtype", opts.dtype,
           "--reference-stop", opts.reference_stop]
    row = run_child(cmd, opts)
    if "error" not in row:
        return {**{k: v for k, v in row.items() if not k.startswith(phase + "_")}, "phase": phase,
                "ms": row[f"{phase}_ms"], "peak_mb": row[f"{phase}_peak_mb"], "extra_mb": row[f"{phase}_extra_mb"]}
    return dict(processor=processor, phase=phase, latent=latent, **row)


def run_child(cmd: list[str], opts) -> dict:
    """Run one measurement process (``opts.threads`` and ``opts.mem_limit_gb`` passed on); its last stdout line as
    JSON, or ``{"error", "returncode", "stderr_tail"}`` when it fails or runs out of memory."""
    if opts.threads:
        cmd = cmd + ["--threads", str(opts.threads)]
    if opts.mem_limit_gb is not None:
        cmd = cmd + ["--mem-limit-gb", str(opts.mem_limit_gb)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode == 0 and lines:
        return json.loads(lines[-1])
    oom = "can't allocate memory" in res.stderr or "MemoryError" in res.stderr or res.returncode in (-9, 137)
    error = f"out of memory (limit {opts.mem_limit_gb} GB)" if oom else (res.stderr.strip().splitlines() or ["?"])[-1]
    return dict(error=error, returncode=res.returncode, stderr_tail=res.stderr[-2000:])


def default_mem_limit_gb() -> float | None:
    avail = proc_kb("MemAvailable", "/proc/meminfo")
    return None if avail is None else round(0.8 * avail / 2**20, 1)


def add_ratios(rows: list[dict]) -> None:
    """Per (latent, phase): baseline ms / fused ms, fused peak / baseline peak, fused extra / baseline extra."""
    base = {(r["latent"], r["phase"]): r for r in rows if r["processor"] == "fused" and "error" not in r}
    for r in rows:
        f = base.get((r["latent"], r["phase"]))
        if f is None or "error" in r:
            continue
        r["fused_speedup"] = r["ms"] / f["ms"]
        r["fused_peak_ratio"] = f["peak_mb"] / r["peak_mb"]
        extra, base_extra = r.get("extra_mb"), f.get("extra_mb")
        r["fused_extra_ratio"] = base_extra / extra if extra and base_extra and extra > 0 and base_extra > 0 else None


def format_table(rows: list[dict], opts) -> str:
    ok = [r for r in rows if "error" not in r]
    threads = ok[0]["threads"] if ok else "?"
    out = [f"ViCo step, {opts.model} UNet, {opts.device} {opts.dtype}, torch {torch.__version__}, {threads} threads, "
           f"best of {opts.repeat}, reference stop: {opts.reference_stop}",
           "| latent | step | processor | ref. stop | ms | peak MB | extra MB | fused speed-up | "
           "fused/this peak | fused/this extra |",
           "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        if "error" in r:
            out.append(f"| {r['latent']} | {r['phase']} | {r['processor']} | | {r['error']} | | | | | |")
            continue
        out.append(f"| {r['latent']} | {r['phase']} | {r['processor']} | {'yes' if r['reference_stop'] else 'no'} | "
                   f"{r['ms']:.1f} | {r['peak_mb']:.0f} | {f(r['extra_mb'], '.0f')} | "
                   f"{f(r.get('fused_speedup'), '.2f')}x | {f(r.get('fused_peak_ratio'), '.2f')} | "
                   f"{f(r.get('fused_extra_ratio'), '.2f')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd15", "sdxl"], default="tiny",
                   help="tiny pipeline, or an SD 1.5-sized UNet + CLIP-sized text encoder, or SDXL base's UNet + "
                   "CLIP-L + OpenCLIP-bigG, with random weights")
    p.add_argument("--latent", type=int, nargs="+",
                   help="latent sides (default: 16 for tiny; 32 48 for sd15 on CPU, 64 96 128 on CUDA)")
    p.add_argument("--processors", nargs="+", choices=PROCESSORS, default=list(PROCESSORS),
                   help="processors to compare (fused is always run first: the ratios need it)")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="steps to time")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per measurement after a warm-up (best of N)")
    p.add_argument("--device", default=fused.default_device(), help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each child (default: torch's)")
    p.add_argument("--reference-stop", choices=["fused", "all", "none"], default="fused",
                   help="which rows stop ViCo's reference half after the last flagged layer: the fused row only "
                        "(default; the baselines run the full UNet as the official code does), all rows (isolates "
                        "the attention kernels), or none")
    p.add_argument("--mem-limit-gb", type=float, default=default_mem_limit_gb(),
                   help="CPU: address space a child may add after start-up before it stops with 'out of memory' "
                        "(default: 80%% of MemAvailable; 0: no limit)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--profile", choices=PROCESSORS,
                   help="instead of timing: print a torch.profiler table of one step of this processor "
                        "(first --phases entry, first --latent) in this process")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.dtype = opts.dtype or ("fp16" if opts.device == "cuda" else "fp32")
    if opts.latent is None:
        opts.latent = [16] if opts.model == "tiny" else ([64, 96, 128] if opts.device == "cuda" else [32, 48])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.profile:
        print(profile(opts.profile, opts.model, opts.latent[0], opts.phases[0], opts.device, DTYPES[opts.dtype]))
        return 0
    if opts.one:
        if opts.device != "cuda":
            limit_memory(opts.mem_limit_gb)
        stop = opts.reference_stop == "all" or (opts.reference_stop == "fused" and opts.one == "fused")
        print(json.dumps(run_one(opts.one, opts.model, opts.latent[0], opts.repeat, opts.device, DTYPES[opts.dtype],
                                 stop, phases=[opts.phase])))
        return 0
    processors = ["fused"] + [n for n in opts.processors if n != "fused"]
    rows = []
    for latent in opts.latent:
        for phase in opts.phases:
            for name in processors:
                rows.append(child(opts, name, phase, latent))
                if not opts.json:
                    r = rows[-1]
                    print(f"  {latent} {phase} {name}: " + (r["error"] if "error" in r else f"{r['ms']:.1f} ms"),
                          file=sys.stderr, flush=True)
    add_ratios(rows)
    if opts.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, opts))
    failed = [r for r in rows if "error" in r and not r["error"].startswith("out of memory")]
    for r in failed:
        print(f"{r['processor']} {r['phase']} latent {r['latent']} failed:\n{r['stderr_tail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
