"""Kernels checked against the float64 reference: at first use, and on demand.

First use (``verdict``, called by ``fused._dispatch``): the first time a compiled
kernel is about to run for a (device model, backend, op, dtype, head-dim class),
a small case of that kind runs against the float64 reference — forward, and
backward for attention — and the verdict is remembered in memory and on disk
(``<kernel cache>/selfcheck/``, keyed also by the torch and triton versions and
a hash of the kernel's sources). A kernel that fails to build or launch, or
misses the tolerance, is not used for that key: one warning names the kernel,
the case and the error, and dispatch moves on to the next backend.
``FUSED_SELFCHECK=0`` switches the check off; ``FUSED_SELFCHECK=force`` runs it
again once per process, ignoring verdicts on disk; ``FUSED_SELFCHECK_DIR`` moves
the verdicts.

``python -m fused.selfcheck``: the verdicts on disk, then every available
backend on a few shapes (including SD's head dims and 77 text tokens) against
the reference: forward and backward, max error, time and speed vs the reference
at the same dtype. Exits non-zero when any error exceeds its tolerance, so it
doubles as an installation check.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from . import reference
from ._dispatch import available_backends, default_device, implementation
from .benchmark.timing import time_ms
from .ops import cross_attention_with_maps, masked_attention, otsu_mask

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

# --- first use ----------------------------------------------------------------------------------------------

def _head_dim_class(head_dim: int | None) -> int:
    """Kernels are specialised on the power-of-two block that holds the head dim."""
    return 0 if head_dim is None else max(16, 1 << (int(head_dim) - 1).bit_length())


@functools.cache
def _source_hash(backend: str) -> str:
    """A hash of the sources a backend's kernels are built from."""
    here = Path(__file__).resolve().parent
    if backend == "triton":
        files = sorted((here / "triton").glob("*.py"))
    elif backend == "sdpa":
        files = [here / "sdpa.py"]
    else:
        from . import _cpp

        src = _cpp.source_dir()
        names = _cpp.CUDA_SOURCES + ("otsu_rule.h",) if backend == "cuda" else _cpp.CPU_SOURCES + _cpp.CPU_HEADERS
        files = [src / n for n in names]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _versions() -> str:
    try:
        triton_v = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_v = "none"
    return f"torch {torch.__version__}, triton {triton_v}"


def _device_name(device_type: str) -> str:
    return torch.cuda.get_device_name() if device_type == "cuda" else device_type


def cache_dir() -> Path:
    """``FUSED_SELFCHECK_DIR``, else ``selfcheck/`` in the kernel build cache."""
    env = os.environ.get("FUSED_SELFCHECK_DIR")
    if env:
        return Path(env)
    from ._cpp import cache_root

    return cache_root() / "selfcheck"


def _key(backend: str, op: str, device_type: str, dtype: torch.dtype, head_dim: int | None) -> dict:
    return {"backend": backend, "op": op, "device": _device_name(device_type),
            "dtype": str(dtype).replace("torch.", ""),
            "head_dim_class": _head_dim_class(head_dim) if op == "attention" else 0,
            "versions": _versions(), "source": _source_hash(backend)}


def _path(key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / f"{name}.json"


_VERDICTS: dict[tuple, str] = {}  # (backend, op, device type, dtype, head dim class) -> verdict, this process


def verdict(backend: str, op: str, device_type: str, dtype: torch.dtype, head_dim: int | None) -> str:
    """"" when the backend's kernel for this key agrees with the reference; else what went wrong."""
    mode = os.environ.get("FUSED_SELFCHECK", "1")
    if mode == "0" or (device_type == "cuda" and not torch.cuda.is_available()):
        return ""  # off; or a dispatch question about CUDA tensors where none can exist
    memo = (backend, op, device_type, dtype, _head_dim_class(head_dim) if op == "attention" else 0)
    if memo in _VERDICTS:  # the per-call path: one dict lookup
        return _VERDICTS[memo]
    key = _key(backend, op, device_type, dtype, head_dim)
    path = _path(key)
    if mode != "force":
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                _VERDICTS[memo] = saved["error"]
                return saved["error"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or unreadable: check again
    if torch.compiler.is_compiling():
        return ""  # a graph being traced cannot run kernels; eager calls check first
    error = run_case(backend, op, device_type, dtype, key["head_dim_class"] or 24)
    _VERDICTS[memo] = error
    _save(path, {"key": key, "error": error})
    if error:
        warnings.warn(f"fused: the {backend} kernel for {op} ({key['dtype']}, head dim class "
                      f"{key['head_dim_class']}, {key['device']}) failed its first-use check against the float64 "
                      f"reference and will not be used: {error}", RuntimeWarning, stacklevel=5)
    return error


def _save(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the check again in the next process


def _attention_case(device: str, head_dim: int) -> tuple:
    """B=2, H=2, N=37, L=19: odd sizes, a -1 slot, a repeated column and hidden keys."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, head_dim, generator=g, dtype=torch.float64) * 0.5 for n in (37, 19, 19))
    index = torch.tensor([[1, 5, -1], [0, 0, 18]])
    key_mask = torch.rand(2, 19, generator=g) > 0.4
    key_mask[:, 0] = True
    return q, k, v, index, key_mask


def _outputs(fn, q, k, v, index, key_mask, scale) -> list[torch.Tensor]:
    """out, maps (when indexed) and the gradients of a loss that uses both."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, maps = fn(q, k, v, index, key_mask, scale, "mean")
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).view(out.shape)
    loss = (out.double() * weights).sum()
    if maps is not None:
        loss = loss + maps.double().square().sum()
    return [out] + ([maps] if maps is not None else []) + list(torch.autograd.grad(loss, (q, k, v)))


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def run_case(backend: str, op: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """Run the first-use case; "" when every output is within tolerance, else the failure in one line."""
    device = "cuda" if device_type == "cuda" else "cpu"
    # The first use may come inside the caller's no_grad, inference_mode or autocast (sampling does): the
    # case needs gradients and its own dtypes, so those modes are switched off for it alone.
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device, enabled=False):
            return _run_case(backend, op, device, dtype, head_dim)
    except Exception as exc:  # a build, compile or launch failure is a verdict too
        return _first_line(exc)


def _run_case(backend: str, op: str, device: str, dtype: torch.dtype, head_dim: int) -> str:
    fns = implementation(backend)
    if op == "otsu_mask":
        return _otsu_case(fns, device, dtype)
    for grid in _forward_grids(backend):
        with _forced_grid(grid):
            error = _attention_case_errors(fns, device, dtype, head_dim)
        if error:
            return error + (f" ({grid} grid)" if grid else "")
    return ""


def _forward_grids(backend: str) -> tuple[str | None, ...]:
    """Triton's forward has two grids, picked per call by size: the small case checks both."""
    return ("heads", "loop") if backend == "triton" else (None,)


@contextlib.contextmanager
def _forced_grid(grid: str | None):
    if grid is None:
        yield
        return
    from .triton.attention_fwd import GRID_ENV

    before = os.environ.get(GRID_ENV)
    os.environ[GRID_ENV] = grid
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GRID_ENV, None)
        else:
            os.environ[GRID_ENV] = before


def _attention_case_errors(fns, device: str, dtype: torch.dtype, head_dim: int) -> str:
    """"" when the attention case agrees with the reference, else the first disagreement."""
    q, k, v, index, key_mask = _attention_case(device, head_dim)
    scale = head_dim ** -0.5
    for name, idx, mask in (("maps", index, None), ("maps and a key mask", index, key_mask),
                            ("a key mask", None, key_mask)):
        moved = [t.to(device, dtype) for t in (q, k, v)] + [None if t is None else t.to(device) for t in (idx, mask)]
        got = _outputs(fns.attention, *moved, scale)
        want = _outputs(reference.attention, q, k, v, idx, mask, scale)
        labels = ("out", "maps", "dq", "dk", "dv") if idx is not None else ("out", "dq", "dk", "dv")
        for label, a, b in zip(labels, got, want):
            err = float((a.detach().double().cpu() - b.detach()).abs().max())
            if not err <= TOLERANCE[dtype]:
                return (f"attention with {name}, q [2, 2, 37, {head_dim}], k [2, 2, 19, {head_dim}]: "
                        f"{label} differs by {err:.3g} (tolerance {TOLERANCE[dtype]:g})")
    return ""


def _otsu_case(fns, device: str, dtype: torch.dtype) -> str:
    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(4, 300, generator=g, dtype=torch.float64) ** 3).to(dtype)
    for mode in ("vico", "skimage"):
        _, mask = fns.otsu_mask(maps.to(device), 10, mode)
        _, want = reference.otsu_mask(maps, 10, mode)
        wrong = int((mask.cpu() != want).sum())
        if wrong:
            return f"otsu_mask {mode}, maps [4, 300] {dtype}: {wrong} mask elements differ from the reference"
    return ""


def cached_verdicts() -> list[dict]:
    """Every verdict on disk, oldest first."""
    records = []
    for path in sorted(cache_dir().glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def run_first_use(device: str, head_dims: list[int]) -> int:
    """Every checked backend's first-use verdict on ``device``; non-zero exit when one fails."""
    from ._dispatch import REGISTRY

    device_type = torch.device(device).type
    failed = False
    for name in available_backends(device):
        info = REGISTRY[name]
        if not info.self_checked:
            continue
        for op in info.dtypes:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                if info.refusal(op, dtype, device_type) is not None:
                    continue
                for head_dim in head_dims if op == "attention" else [None]:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        error = verdict(name, op, device_type, dtype, head_dim)
                    failed |= bool(error)
                    print(f"{name:7} {op:10} {str(dtype).replace('torch.', ''):9} head dim {head_dim or '-':<4} "
                          f"{'ok' if not error else 'FAILED: ' + error}", flush=True)
    return 1 if failed else 0


def print_verdicts() -> None:
    records = cached_verdicts()
    print(f"first-use verdicts in {cache_dir()}: {len(records)}")
    for r in records:
        k = r["key"]
        print(f"  {k['backend']:7} {k['op']:10} {k['dtype']:9} head dim class {k['head_dim_class']:<4} {k['device']}: "
              f"{'ok' if not r['error'] else 'FAILED: ' + r['error']}  ({k['versions']}, source {k['source']})")


# --- on demand ----------------------------------------------------------------------------------------------


def _cases(device: str, quick: bool):
    shapes = [(2, 8, 256, 77, 40), (1, 4, 130, 600, 24)] if quick else [
        (2, 8, 1024, 77, 40), (2, 8, 256, 77, 80), (2, 8, 64, 77, 160), (1, 4, 512, 1024, 64)]
    g = torch.Generator().manual_seed(0)
    for B, H, N, L, D in shapes:
        q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (N, L, L))
        idx = torch.tensor([[1, 5, -1]] * B)
        key_mask = torch.rand(B, L, generator=g) > 0.5
        yield "cross_attention_with_maps", (B, H, N, L, D), (q, k, v, idx)
        yield "masked_attention", (B, H, N, L, D), (q, k, v, key_mask)
    yield "otsu_mask", (16, 4096), (torch.rand(16, 4096, generator=g, dtype=torch.float64) ** 4,)


def _run(op: str, args, backend: str):
    """Forward outputs and input gradients (for the attention ops) as one flat list."""
    if op == "otsu_mask":
        return list(otsu_mask(*args, backend=backend))
    q, k, v, extra = args
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fn = cross_attention_with_maps if op == "cross_attention_with_maps" else masked_attention
    outs = fn(q, k, v, extra, backend=backend)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (q, k, v))
    return outs + list(grads)


def _reference(op: str, args):
    if op == "otsu_mask":
        return list(reference.otsu_mask(args[0], 10, "vico"))
    q, k, v, extra = (t.detach().requires_grad_() if t.is_floating_point() else t for t in args)
    scale = q.shape[-1] ** -0.5
    if op == "cross_attention_with_maps":
        outs = list(reference.attention_with_maps(q, k, v, extra, scale, "mean"))
    else:
        outs = [reference.masked_attention(q, k, v, extra, scale)]
    return outs + list(torch.autograd.grad(sum(o.sum() for o in outs), (q, k, v)))


def _max_error(got, want) -> float:
    err = 0.0
    for a, b in zip(got, want):
        if a.dtype == torch.bool:
            err = max(err, float((a != b.to(a.device)).sum()))  # mismatching mask elements
        else:
            err = max(err, float((a.detach().double().cpu() - b.detach().double()).abs().max()))
    return err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--full", action="store_true", help="larger shapes (slower)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (best of)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    parser.add_argument("--verdicts", action="store_true",
                        help="only print the first-use verdicts remembered on this machine, then exit")
    parser.add_argument("--first-use", action="store_true",
                        help="run (FUSED_SELFCHECK=force: again) the first-use check of every checked backend on "
                             "--device for fp16/bf16/fp32 and --head-dims, print the verdicts, then exit")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[40, 64, 80, 128, 160])
    opts = parser.parse_args(argv)
    if opts.first_use:
        return run_first_use(opts.device, opts.head_dims)
    if opts.verdicts or not opts.json:
        print_verdicts()
    if opts.verdicts:
        return 0

    backends = available_backends(opts.device)
    dtypes = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if opts.device == "cuda" else [])
    rows, failed = [], False
    for op, shape, args64 in _cases(opts.device, quick=not opts.full):
        want = _reference(op, args64)
        for dtype in dtypes:
            args = [a.to(opts.device, dtype) if a.is_floating_point() else a.to(opts.device) for a in args64]
            ref_time = min(time_ms(lambda: _run(op, args, "torch"), opts.device, opts.repeat))
            for backend in backends:
                try:
                    got = _run(op, args, backend)
                except (TypeError, ValueError):
                    continue  # this backend has no kernel for this op/dtype
                err = _max_error(got, want)
                ok = err == 0 if op == "otsu_mask" and dtype == torch.float64 else err <= TOLERANCE[dtype]
                failed |= not ok
                t = min(time_ms(lambda: _run(op, args, backend), opts.device, opts.repeat))
                rows.append(dict(backend=backend, op=op, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                                 max_error=err, ms=t, vs_reference=ref_time / t, ok=ok))
    if opts.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"fused selfcheck on {opts.device} (torch {torch.__version__}); backends: {', '.join(backends)}")
        print("errors: max |backend - float64 reference| over outputs and input gradients "
              "(Otsu: mismatching mask elements); time: forward+backward, best of "
              f"{opts.repeat}; speed-up vs the torch reference at the same dtype")
        header = f"{'backend':8} {'op':26} {'shape':22} {'dtype':9} {'max error':>10} {'ms':>9} {'vs ref':>7}  ok"
        print(header)
        print("-" * len(header))
        for r in rows:
            print(f"{r['backend']:8} {r['op']:26} {str(tuple(r['shape'])):22} {r['dtype']:9} "
                  f"{r['max_error']:10.2e} {r['ms']:9.2f} {r['vs_reference']:6.2f}x  {'yes' if r['ok'] else 'NO'}")
    print("selfcheck: " + ("FAILED" if failed else "all backends agree with the reference"), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
