"""Compile every Triton kernel for a GPU architecture on a machine without a GPU.

    python tools/triton_compile_check.py                 # sm_80 and sm_90, SD 1.5 shapes, fp32/fp16/bf16
    python tools/triton_compile_check.py --arch 90 --quick --json

Why: a machine without a GPU can still compile, and the interpreter (TRITON_INTERPRET=1) runs
the kernels' Python, not the compiler. This script drives the real launch
wrappers (``fused/triton/*``) with CPU tensors of the real shapes, but swaps
Triton's active driver for one that only *names* a target (``GPUTarget``), and
turns every launch into a compile (``warmup``). Every autotune configuration is
compiled, not only the one a benchmark would pick. Each cubin then goes
through cuobjdump (shipped in the triton wheel) for registers and stack (spills).

It proves: the kernels lower through Triton's whole pipeline to a cubin for that
architecture (dtype constexprs, float64 ``tl.dot``, ``enable_fp_fusion``,
BLOCK_D=256 for D=160), and how many registers/spill bytes/shared memory each
configuration needs. It does not run anything: speed and numerics still need
``benchmarks/gpu_check.py`` on a GPU.

Exit status: 1 if any compile fails or a launch has no configuration that fits
in the architecture's shared memory (it would fail at run time), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must precede importing triton: compile, don't interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fused.benchmark import DTYPES, SD15_ATTN2, SD15_IMAGE  # noqa: E402

# Usable shared memory per block (opt-in maximum) in bytes, from NVIDIA's CUDA C guide.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# (B, H, N, L, D): SD 1.5 text cross-attention (L=77) at every resolution, and ViCo's image attention.
SD15_SHAPES = SD15_ATTN2 + SD15_IMAGE
QUICK_SHAPES = [(2, 8, 4096, 77, 40), (2, 8, 256, 77, 160), (2, 8, 256, 256, 160)]


class TargetOnlyDriver(DriverBase):
    """A Triton driver that knows the target to compile for and nothing else: enough for
    ``JITFunction.run(warmup=True)``, which compiles without loading or launching."""

    @classmethod
    def is_active(cls) -> bool:
        return False

    def __init__(self, arch: int):
        super().__init__()
        self.target = GPUTarget("cuda", arch, 32)

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("compile only")

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("compile only")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass


def _plain(value):
    """A constexpr as JSON can hold it (tl.float32 -> "fp32")."""
    return value if isinstance(value, (int, float, bool, str)) else str(value)


class CompileRecorder:
    """Patches Triton so that every launch compiles (all autotune configs) and is recorded."""

    def __init__(self, all_configs: bool = True):
        self.kernels: dict[tuple, dict] = {}
        self.variant = ""
        self.dtype = ""
        self.all_configs = all_configs

    def __enter__(self):
        self._jit_run, self._tune_run = JITFunction.run, Autotuner.run
        recorder, jit_run = self, JITFunction.run

        def compile_only(fn, *args, grid, warmup, **kwargs):
            cached = fn.device_caches.get(0)
            if cached is not None and cached[2] != triton_driver.active.get_current_target():
                fn.device_caches.clear()  # the binder was made for another architecture
            kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            bound = dict(zip(fn.arg_names, args)) | kwargs
            meta = {p.name: _plain(bound[p.name]) for p in fn.params if p.is_constexpr and p.name in bound}
            meta |= {k: v for k, v in kwargs.items() if k.startswith("num_")}
            entry = recorder.kernels.setdefault((kernel.hash, recorder.arch), dict(
                kernel=fn.fn.__name__, arch=recorder.arch, dtype=recorder.dtype, variant=recorder.variant, meta=meta,
                compiled=kernel, variants=[]))
            if recorder.variant not in entry["variants"]:
                entry["variants"].append(recorder.variant)
            return kernel

        def every_config(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)  # what the autotuner would time
            for config in configs if recorder.all_configs else configs[:1]:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())

        JITFunction.run, Autotuner.run = compile_only, every_config
        return self

    def __exit__(self, *exc):
        JITFunction.run, Autotuner.run = self._jit_run, self._tune_run
        return False


# Both forward grids (fused/triton/attention_fwd.py: use_head_loop), whichever the rule picks at a shape.
FORWARD_GRIDS = ("heads", "loop")


def forward_on(grid: str, launch):
    """``launch`` with the forward grid forced to ``grid`` ("heads" or "loop")."""
    from fused.triton.attention_fwd import GRID_ENV

    def run():
        before = os.environ.get(GRID_ENV)
        os.environ[GRID_ENV] = grid
        try:
            launch()
        finally:
            if before is None:
                os.environ.pop(GRID_ENV)
            else:
                os.environ[GRID_ENV] = before
    return run


def launch_everything(dtype: torch.dtype, shapes, recorder: CompileRecorder) -> list[str]:
    """Call every launch wrapper the ops use; returns error lines (compile failures)."""
    from fused.triton.attention_bwd import attention_backward
    from fused.triton.attention_fwd import attention_forward
    from fused.triton.otsu import otsu_forward

    errors = []

    def attempt(variant, fn, dtype=dtype):
        recorder.variant, recorder.dtype = variant, str(dtype).removeprefix("torch.")
        try:
            fn()
        except Exception as exc:  # report every failure, keep compiling the rest
            first = str(exc).strip().splitlines()
            errors.append(f"sm_{recorder.arch} {variant}: {type(exc).__name__}: {first[0] if first else ''}")

    for B, H, N, L, D in shapes:
        q = torch.zeros(B, H, N, D, dtype=dtype)
        k = v = torch.zeros(B, H, L, D, dtype=dtype)
        out, grad = torch.zeros_like(q), torch.zeros_like(q)
        lse = torch.zeros(B, H, N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        index = torch.tensor([[5, 6]] * B)
        key_mask = torch.ones(B, L, dtype=torch.bool)
        name = f"{str(dtype)[6:]} {B}x{H}x{N}x{L}x{D}"
        if L == 77:  # text cross-attention: maps, forward and backward, both head reductions
            for mean in (True, False):
                for grid in FORWARD_GRIDS:
                    attempt(f"maps fwd {name} mean={mean} grid={grid}", forward_on(
                        grid, lambda: attention_forward(q, k, v, token_index=index, scale=0.1, head_mean=mean)))
                gmaps = torch.zeros(B, 2, N, dtype=dtype) if mean else torch.zeros(B, H, 2, N, dtype=dtype)
                attempt(f"maps bwd {name} mean={mean}",
                        lambda: attention_backward(q, k, v, out, lse, grad, 0.1, token_index=index,
                                                   grad_maps=gmaps, head_mean=mean))
        else:  # image attention under ViCo's key mask
            for grid in FORWARD_GRIDS:
                attempt(f"masked fwd {name} grid={grid}",
                        forward_on(grid, lambda: attention_forward(q, k, v, key_mask=key_mask, scale=0.1)))
            attempt(f"masked bwd {name}", lambda: attention_backward(q, k, v, out, lse, grad, 0.1, key_mask=key_mask))
    for mode in ("vico", "skimage"):
        attempt(f"otsu {str(dtype)[6:]} 16x4096 {mode}", lambda: otsu_forward(torch.rand(16, 4096).to(dtype), 256, mode))
        # fp64 Otsu does run on Triton on CUDA (only fp64 attention is dispatched elsewhere)
        attempt(f"otsu float64 16x4096 {mode}",
                lambda: otsu_forward(torch.rand(16, 4096, dtype=torch.float64), 256, mode), dtype=torch.float64)
    return errors


RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_usage(cubin: bytes) -> dict:
    """Registers, stack frame and local memory per thread, read from the cubin by the
    cuobjdump shipped in the triton wheel (ptxas already ran inside triton.compile;
    running it again costs minutes for the big float32 kernels). Our kernels keep no
    arrays in local memory, so a non-zero stack frame means register spills."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    regs, stack, _, local = map(int, RESOURCE.search(text).groups())
    return dict(registers=regs, stack_bytes=stack, local_bytes=local)


def summarise(recorder: CompileRecorder) -> list[dict]:
    rows = []
    for entry in recorder.kernels.values():
        compiled = entry.pop("compiled")
        usage = cubin_usage(compiled.asm["cubin"])
        shared = int(compiled.metadata.shared)
        entry.update(usage, shared_bytes=shared,
                     fits_shared=shared <= SHARED_LIMIT.get(entry["arch"], 99 * 1024))
        rows.append(entry)
    return rows


def launch_failures(rows: list[dict]) -> list[str]:
    """Launches where *no* configuration fits in shared memory. One oversized
    configuration in an autotune list is harmless (the autotuner skips it as
    OutOfResources); a launch with nothing that fits would fail."""
    fits: dict[tuple, list[bool]] = {}
    for r in rows:
        for variant in r["variants"]:
            fits.setdefault((r["arch"], r["kernel"], variant), []).append(r["fits_shared"])
    return [f"sm_{arch} {kernel} {variant}: no configuration fits in shared memory"
            for (arch, kernel, variant), ok in fits.items() if not any(ok)]


def table(rows: list[dict]) -> str:
    lines = ["| arch | kernel | first variant | config | regs | stack B (spills) | shared KB |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        m = r["meta"]
        config = " ".join(f"{k}={v}" for k, v in m.items()
                          if k in ("BLOCK_N", "BLOCK_L", "BLOCK_D", "BLOCK_T", "BLOCK", "CHUNK", "BLOCK_C", "num_warps",
                                   "num_stages"))
        flags = " ".join(k for k in ("HAS_MAPS", "HEAD_MEAN", "HAS_MASK", "VICO") if m.get(k) is True)
        lines.append(f"| sm_{r['arch']} | {r['kernel']} {flags} | {r['variant']} | {config} | {r['registers']} | "
                     f"{r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f}"
                     f"{'' if r['fits_shared'] else ' (TOO MUCH)'} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per (arch, dtype, kernel, padded head dim) over its configurations."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["dtype"], r["kernel"].strip("_"), r["meta"].get("BLOCK_D", 0)), []).append(r)
    lines = ["| arch | dtype | kernel | BLOCK_D | compiled (variants x configs) | without spills | max stack B | max regs | max shared KB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (arch, dtype, kernel, block_d), rs in sorted(groups.items()):
        lines.append(f"| sm_{arch} | {dtype} | {kernel} | {block_d or '-'} | {len(rs)} | "
                     f"{sum(r['stack_bytes'] == 0 for r in rs)} | {max(r['stack_bytes'] for r in rs)} | "
                     f"{max(r['registers'] for r in rs)} | {max(r['shared_bytes'] for r in rs) / 1024:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities to compile for (80 = A100, 90 = H100/H200)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16", "bf16"],
                        help="input dtypes (default: those fused dispatches to Triton on CUDA; fp64 attention "
                             "is not, because it does not compile: --dtype fp64 shows why)")
    parser.add_argument("--quick", action="store_true", help="two shapes instead of all SD 1.5 shapes")
    parser.add_argument("--first-config", action="store_true",
                        help="only the first autotune configuration of each kernel (CI: fewer compiles)")
    parser.add_argument("--summary", action="store_true",
                        help="one line per kernel, dtype and head dim instead of one per configuration")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    errors: list[str] = []
    rows: list[dict] = []
    for arch in args.arch:
        triton_driver.set_active(TargetOnlyDriver(arch))
        try:
            with CompileRecorder(all_configs=not args.first_config) as recorder:
                recorder.arch = arch
                for name in args.dtype:
                    errors += launch_everything(DTYPES[name], QUICK_SHAPES if args.quick else SD15_SHAPES, recorder)
        finally:
            triton_driver.set_active(None)  # back to lazily creating the machine's own driver
        rows += summarise(recorder)
    errors += launch_failures(rows)
    report = dict(triton=triton.__version__, torch=torch.__version__, archs=args.arch, dtypes=args.dtype,
                  seconds=round(time.perf_counter() - start, 1), compiled=len(rows), errors=errors, kernels=rows)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"triton {triton.__version__}, {len(rows)} kernels compiled in {report['seconds']} s, "
              f"{len(errors)} errors\n")
        print(summary(rows) if args.summary else table(rows))
        for e in errors:
            print("ERROR", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
