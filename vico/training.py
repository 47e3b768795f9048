"""Training any method (``vico.methods``) with HF ``accelerate``.

Single process by default; ``accelerate launch -m vico.cli train ...`` (or
``accelerate launch $(which vico) train ...``) scales to several GPUs. All
randomness (image and template choice, noise, timesteps) comes from one CPU
``torch.Generator`` whose state is checkpointed with the weights and AdamW
state, so a resumed run equals an uninterrupted one. Checkpoints are written
to a temporary folder and renamed into place (atomic); Ctrl-C saves one before
exiting.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .data import list_images, load_images
from .methods.base import MethodConfig, atomic_write, describe_error, fsync_path, get_method, write_errors
from .model import UnreadableFile, UserError, check_output_folder, load_components, warn

CHECKPOINTS = "checkpoints"


def save_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt, so training saves a checkpoint before it exits.

    A job started in the background by a non-interactive shell inherits SIGINT
    as *ignored*, and schedulers stop jobs with SIGTERM: both would otherwise
    kill the run without its last checkpoint.
    """
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


class hold_interrupts:
    """Hold SIGINT/SIGTERM over a region that must run as a whole, then act on them.

    The optimizer step and the step counter move together: a signal that lands
    between them would otherwise save post-step weights under the previous
    step number (resume would then apply that step twice). Only signals with a
    Python handler (``save_on_signals``'s, or Python's default SIGINT one) are
    held, and only in the main thread, where handlers run.
    """

    def __enter__(self):
        import signal
        import threading

        self.saved, self.pending = {}, None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(sig)
                if callable(handler):
                    self.saved[sig] = handler
                    signal.signal(sig, self._hold)
        return self

    def _hold(self, signum, frame):
        if self.pending is None:
            self.pending = (signum, frame)

    def __exit__(self, exc_type, exc, tb):
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if self.pending is not None and exc_type is None:
            signum, frame = self.pending
            self.saved[signum](signum, frame)  # e.g. raises KeyboardInterrupt, now that the step is counted
        return False


@dataclass
class TrainConfig:
    model: str
    images: str
    out: str
    method: str = "vico"
    placeholder: str = "S*"
    init_word: str = "object"
    steps: int | None = None  # None: the method's default (per stage for multi-stage methods)
    batch_size: int | None = None  # None: the method's default
    scale_lr: bool | None = None  # lr x batch size x processes; None: the method's default
    checkpoint_every: int = 100
    seed: int = 0
    resolution: int | None = None  # None: the UNet's native size
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    resume: bool = False
    layers: list[str] | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _checkpoint_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), key=lambda p: p.name)


def save_checkpoint(out: Path, step: int, method, optimizer, generator: torch.Generator, stage: int = 0) -> Path:
    """checkpoints/step-XXXXXX/ with the concept, AdamW state, stage and RNG, renamed into place.

    Written into ``.tmp-step-...``, every file and the folder fsynced, then renamed
    and the parent fsynced: a crash or power cut leaves the previous checkpoints
    whole. A full disk or read-only folder raises a one-line ``UserError``.
    """
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    old = root / f".tmp-old-step-{step:06d}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        method.save(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step,
                    "stage": stage}, tmp / "trainer.pt")
        for f in tmp.iterdir():
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # a folder cannot be renamed over a full one: move the old one aside first
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(root)
    except (UserError, *write_errors()) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = exc.__cause__ if isinstance(exc, UserError) and exc.__cause__ is not None else exc
        if old.exists() and not final.exists():
            os.replace(old, final)
        kept = [p.name for p in _checkpoint_dirs(out)]
        safe = f"the checkpoints already there (newest {kept[-1]}) are intact" if kept else "no checkpoint was kept"
        raise UserError(f"cannot write checkpoint {final.name} in {root}: {describe_error(cause)}; {safe}; free "
                        "space or fix permissions, then rerun with --resume") from None
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete what a killed run left half-written: ``checkpoints/.tmp-*`` folders and ``.NAME.tmpPID``
    files in ``out``, unless the process that named them is still running."""
    def owner_alive(name: str) -> bool:
        match = re.search(r"(?:-|\.tmp)(\d+)$", name)
        if not match or int(match.group(1)) == os.getpid():
            return False
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OSError):
            return True
        return True

    stale = []
    if (out / CHECKPOINTS).is_dir():
        stale += [p for p in (out / CHECKPOINTS).iterdir() if p.name.startswith(".tmp-")]
    if out.is_dir():
        stale += [p for p in out.iterdir() if p.is_file() and re.fullmatch(r"\..+\.tmp\d+", p.name)]
    removed = []
    for path in stale:
        if owner_alive(path.name):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _load_checkpoint(path: Path, method, generator: torch.Generator) -> dict:
    """Restore weights and RNG; returns the trainer state (step, stage, optimizer)."""
    from .methods.base import read_concept

    _, weights = read_concept(path)
    method.load_state_dict(weights)
    state = load_trainer_state(path / "trainer.pt")
    generator.set_state(state["generator"])
    return state


def load_trainer_state(path: Path) -> dict:
    """The optimizer/RNG/step state of a checkpoint, read with ``weights_only=True``.

    A checkpoint folder is something users are handed: a pickle that names any
    global other than tensors and plain containers is refused, never run.
    """
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UnreadableFile(f"checkpoint file {path} is missing") from None
    except Exception as exc:
        text = str(exc).strip()
        if "GLOBAL" in text:  # a pickle naming code to run: refuse, never fall back quietly
            blocked = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
            raise UserError(f"refusing to load checkpoint file {path}: not a plain tensor checkpoint "
                            f"({blocked[:200]})") from None
        reason = text.split(". ")[0].splitlines()[0][:200] if text else type(exc).__name__
        if "Weights only load failed" in reason:
            reason = "not a torch checkpoint"
        raise UnreadableFile(f"checkpoint file {path} is unreadable ({reason}): truncated or corrupt") from None
    if not isinstance(state, dict) or not {"optimizer", "generator", "step"} <= set(state):
        raise UnreadableFile(f"checkpoint file {path} is not a vico trainer state (keys optimizer, generator, step)")
    return state


def train(cfg: TrainConfig) -> Path:
    """Train and save a concept into ``cfg.out``; returns that folder."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    for name in ("steps", "batch_size", "checkpoint_every", "resolution"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            hint = "; leave it out for the method's default" if name in ("steps", "batch_size") else ""
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}{hint}")
    check_output_folder(cfg.out)
    # concept.json / train_config.json record where the model and images are: absolute, so that
    # `vico sample` works from any working directory
    cfg = replace(cfg, model=os.path.abspath(cfg.model), images=os.path.abspath(cfg.images))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    out = Path(cfg.out)
    if accelerator.is_main_process:
        for path in remove_stale_temporaries(out):
            warn(f"removed {path}, left half-written by a killed run")
    checkpoints = _checkpoint_dirs(out)
    if checkpoints and not cfg.resume:
        raise UserError(f"{out} already has checkpoints; pass --resume to continue or choose another --out")
    method_cls = get_method(cfg.method)
    list_images(cfg.images)  # fail on a bad folder before loading the model
    comps = load_components(cfg.model, device=accelerator.device)
    vae_scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or comps.unet.config.sample_size * vae_scale
    extra = dict(cfg.extra, **({"layers": cfg.layers} if cfg.layers else {}))
    mcfg = MethodConfig(placeholder=cfg.placeholder, init_word=cfg.init_word, resolution=resolution, seed=cfg.seed,
                        extra=extra)
    images = load_images(cfg.images, resolution)
    set_seed(cfg.seed)  # the new modules' initial weights
    method = method_cls(comps, mcfg)
    method.training_images = images  # pixels, for methods that augment before encoding (AttnDreamBooth)
    if cfg.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()

    with torch.no_grad():  # the VAE is frozen: encode once (flipped copies too when the method flips)
        if method.hflip_prob > 0:
            images = torch.cat([images, images.flip(-1)])
        posterior = comps.vae.encode(images.to(accelerator.device, comps.vae.dtype)).latent_dist
        sf = comps.vae.config.scaling_factor
        latent_mean, latent_std = posterior.mean * sf, posterior.std * sf

    stages = method.stages(cfg.steps, cfg.batch_size)
    total = sum(s.steps for s in stages)
    scale_lr = method.scale_lr if cfg.scale_lr is None else cfg.scale_lr
    generator = torch.Generator().manual_seed(cfg.seed)
    start, resume_state = 0, None
    if checkpoints:
        for i in range(len(checkpoints) - 1, -1, -1):  # newest first; an unreadable one falls back
            try:
                resume_state = _load_checkpoint(checkpoints[i], method, generator)
                break
            except UnreadableFile as exc:
                if i == 0:
                    raise UserError(f"no readable checkpoint in {out / CHECKPOINTS} (the oldest: {exc}); move "
                                    "that folder away to train afresh") from None
                warn(f"{exc}; falling back to the previous checkpoint, {checkpoints[i - 1].name}")
        start = int(resume_state["step"])
        accelerator.print(f"vico: resuming from {checkpoints[i]} (step {start})")
    elif cfg.resume:
        accelerator.print(f"vico: nothing to resume in {out}; starting fresh")
    if start >= total:  # finished, or killed between the last checkpoint and the final save
        if accelerator.is_main_process:
            _save_concept(method, out)
        accelerator.print(f"vico: {out} already finished ({start} of {total} steps); concept in {out}")
        return out
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the output folder {out}: {describe_error(exc)}") from None
        text = json.dumps(asdict(cfg), indent=1)
        atomic_write(out / "train_config.json", lambda p: p.write_text(text))

    bar = tqdm(total=total, initial=start, desc=method.name, file=sys.stderr,
               disable=not cfg.progress or not accelerator.is_local_main_process)
    completed, first = start, 0
    # Wrap the models once (DDP when launched on several GPUs). DDP fixes the set of
    # trainable parameters at wrapping time, so multi-stage methods whose trainable
    # set changes between stages are single-process only for now.
    first_stage = next(i for i, s in enumerate(stages) if start < sum(x.steps for x in stages[: i + 1]))
    method.begin_stage(first_stage)
    if len(stages) > 1 and accelerator.num_processes > 1:
        raise UserError(f"{method.name} trains in stages and runs on one process only for now")
    prepared = accelerator.prepare(*method.trainable_modules())
    comps.unet, comps.text_encoder = prepared[0], prepared[1]
    for index, stage in enumerate(stages):
        last = first + stage.steps
        if start >= last:  # finished before the checkpoint we resumed from
            first = last
            continue
        method.begin_stage(index)
        lr_scale = stage.batch_size * accelerator.num_processes if scale_lr else 1.0
        optimizer = accelerator.prepare(torch.optim.AdamW(method.param_groups(lr_scale, stage=index)))
        if resume_state is not None and int(resume_state.get("stage", 0)) == index and start > first:
            optimizer.load_state_dict(resume_state["optimizer"])
        if len(stages) > 1:
            bar.set_description(f"{method.name} [{stage.name}]")
        gen_state = generator.get_state()
        try:
            for step in range(max(start, first), last):
                gen_state = generator.get_state()
                batch = method.make_batch(latent_mean, latent_std, generator, stage.batch_size)
                with accelerator.autocast():
                    loss, logs = method.training_loss(batch, generator)
                accelerator.backward(loss)
                with hold_interrupts():  # the weights and the step counter move together
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    completed = step + 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
                if accelerator.is_main_process and (completed % cfg.checkpoint_every == 0 or completed == total):
                    save_checkpoint(out, completed, method, optimizer, generator, stage=index)
        except KeyboardInterrupt:
            if accelerator.is_main_process and completed > start:
                if completed == step:  # interrupted inside a step: rewind its random draws
                    generator.set_state(gen_state)
                path = save_checkpoint(out, completed, method, optimizer, generator, stage=index)
                print(f"vico: interrupted; saved {path}; continue with --resume", file=sys.stderr)
            raise
        first = last
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_concept(method, out)
    return out


def _save_concept(method, out: Path) -> None:
    try:
        method.save(out)
    except UserError as exc:
        raise UserError(f"{exc}; the checkpoints in {out / CHECKPOINTS} are intact: rerun with --resume to write "
                        "the concept") from None
