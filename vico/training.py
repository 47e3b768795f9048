"""Training any method (``vico.methods``) with HF ``accelerate``.

Single process by default; ``accelerate launch -m vico.cli train ...`` (or
torchrun) scales to several GPUs and machines. All randomness (image and
template choice, augmentation, noise, timesteps) comes from one CPU
``torch.Generator`` seeded alike on every process. Each step draws the *global*
batch (per-process batch x processes) from it and each process trains on its
own rows (``Method.make_batch(rows=...)``); DDP averages the gradients, so N
processes x batch B train on exactly the samples of one process x N*B. The
generator state is checkpointed with the weights and AdamW state, so a resumed
run equals an uninterrupted one with the same number of processes.
Checkpoints are written to a temporary folder and renamed into place (atomic)
by the main process while the others wait; Ctrl-C saves one before exiting.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .data import list_images, load_images
from .files import atomic_folder, atomic_write, describe_error, load_tensors_only, write_errors
from .methods import get_method
from .methods.base import Method, MethodConfig, MethodOptions, Stage, method_options, option_flag
from .model import (Components, UnreadableFile, UserError, check_image_size, check_model_folder, check_output_folder,
                    check_placeholder, check_seed, check_vae, first_nonfinite, load_components, native_size,
                    require_at_least_one, warn)

if TYPE_CHECKING:
    from accelerate import Accelerator

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
    vae: str | None = None  # a separate VAE folder instead of model/vae (e.g. SDXL's fp16-fixed one)
    method: str = "vico"
    placeholder: str = "S*"
    init_word: str = "object"
    steps: int | None = None  # None: the method's default (per stage for multi-stage methods)
    batch_size: int | None = None  # None: the method's default
    scale_lr: bool | None = None  # lr x batch size x processes; None: the method's default
    checkpoint_every: int = 100
    checkpoints_total_limit: int = 2  # keep the newest N checkpoints; 0 keeps all
    seed: int = 0
    resolution: int | None = None  # None: the UNet's native size
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1  # optimizer steps average this many batches (accelerate's accumulate)
    lr_scheduler: str = "constant"  # a ``diffusers.optimization.get_scheduler`` name, run over each stage
    lr_warmup_steps: int = 0  # optimizer steps of linear warm-up at the start of each stage
    validation_prompts: list[str] | None = None  # None: three of the method's evaluation prompts
    validation_steps: int | None = None  # sample every K steps; None: every checkpoint when prompts are given
    num_validation_images: int = 4
    validation_sample_steps: int = 25
    report_to: str = "none"  # accelerate trackers: tensorboard, wandb, all or none
    logging_dir: str | None = None  # None: OUT/logs
    resume: bool | str = False  # True or "latest": the newest checkpoint; or a checkpoint folder name/path
    resume_with_changes: bool = False  # resume although RESUME_FIXED arguments differ from the saved run's
    learning_rates: dict[str, float] = field(default_factory=dict)  # base lr by group name (--lr NAME=VALUE)
    # the method's own options (``Method.Options``, e.g. ViCo's layers and reg_weight), as an options object
    # or a dict by field name; the run records them whole (defaults filled in) in train_config.json
    options: MethodOptions | dict = field(default_factory=dict)
    progress: bool = True


def _checkpoint_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), key=lambda p: p.name)


def save_checkpoint(out: Path, step: int, method, optimizer, generator: torch.Generator, stage: int = 0,
                    world_size: int = 1, scheduler=None) -> Path:
    """checkpoints/step-XXXXXX/ with the concept, AdamW state, stage, RNG and the number of
    processes, renamed into place. Every process draws from one global random stream
    (``Method.make_batch``), so the main process's generator state is every process's.

    Written into ``.tmp-step-...``, every file and the folder fsynced, then renamed
    and the parent fsynced: a crash or power cut leaves the previous checkpoints
    whole. A full disk or read-only folder raises a one-line ``UserError``.
    """
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"

    def fill(tmp: Path) -> None:
        method.save(tmp)
        state = {"optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step,
                 "stage": stage, "world_size": world_size}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        torch.save(state, tmp / "trainer.pt")

    try:
        return atomic_folder(final, fill)
    except (UserError, *write_errors()) as exc:
        cause = exc.__cause__ if isinstance(exc, UserError) and exc.__cause__ is not None else exc
        kept = [p.name for p in _checkpoint_dirs(out)]
        safe = f"the checkpoints already there (newest {kept[-1]}) are intact" if kept else "no checkpoint was kept"
        raise UserError(f"cannot write checkpoint {final.name} in {root}: {describe_error(cause)}; {safe}; free "
                        "space or fix permissions, then rerun with --resume") from None


def prune_checkpoints(out: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0: keep all); returns what was deleted.

    Called after a checkpoint is whole on disk, so the newest is never at risk;
    keeping two (the default) leaves the fallback that resume uses when the
    newest turns out unreadable."""
    if keep <= 0:
        return []
    doomed = _checkpoint_dirs(out)[:-keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


SUPERSEDED = "superseded"


def resume_candidates(out: Path, resume: bool | str | None, checkpoints: list[Path]) -> list[Path]:
    """The checkpoints to try, newest first: all of them for ``True``/"latest", else the one named
    (a folder name under ``out/checkpoints`` or a path to one of them)."""
    if resume in (True, "latest"):
        return checkpoints[::-1]
    named = Path(str(resume))
    wanted = named if named.is_dir() else out / CHECKPOINTS / named.name
    match = [p for p in checkpoints if p.resolve() == wanted.resolve()]
    if not match:
        have = ", ".join(p.name for p in checkpoints) or "none"
        raise UserError(f"--resume {resume}: not a checkpoint of {out} (checkpoints there: {have}); pass --resume "
                        "or --resume latest for the newest")
    return match


def supersede_newer(out: Path, chosen: Path) -> list[Path]:
    """Move the checkpoints newer than ``chosen`` to ``checkpoints/superseded/`` (a run resumed from an
    older one writes new ones with the same names). Only an earlier superseded copy of the same
    name is replaced; the run's own checkpoints are moved, not deleted."""
    moved = []
    for path in _checkpoint_dirs(out):
        if path.name > chosen.name:
            target = out / CHECKPOINTS / SUPERSEDED / path.name
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    return moved


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
    from .methods.base import WEIGHTS_FILE, load_weights, read_concept

    _, weights = read_concept(path)
    load_weights(method, weights, path / WEIGHTS_FILE)
    state = load_trainer_state(path / "trainer.pt")
    generator.set_state(state["generator"])
    return state


def load_trainer_state(path: Path) -> dict:
    """The optimizer/RNG/step state of a checkpoint, read with ``weights_only=True``.

    A checkpoint folder is something users are handed: a pickle that names any
    global other than tensors and plain containers is refused, never run.
    """
    state = load_tensors_only(path, "checkpoint")
    if not isinstance(state, dict) or not {"optimizer", "generator", "step"} <= set(state):
        raise UnreadableFile(f"checkpoint file {path} is not a vico trainer state (keys optimizer, generator, step)")
    return state


def check_learning_rates(method_cls, learning_rates: dict[str, float]) -> None:
    """One-line error for a learning-rate override the method has no group for, or not a positive number."""
    names = method_cls.learning_rate_names()
    for name, value in learning_rates.items():
        if name not in names:
            known = ", ".join(f"{k} (default {v:g})" for k, v in names.items())
            raise UserError(f"--lr {name}=...: {method_cls.name} has no parameter group {name!r}; it has {known}")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"--lr {name}={value}: a learning rate must be a positive finite number")


def check_inputs(cfg: TrainConfig, method_cls, options: MethodOptions) -> None:
    """One line for a bad token, seed, image folder, resolution or layer name, from the configs alone."""
    check_placeholder(cfg.placeholder)
    check_seed(cfg.seed)
    list_images(cfg.images)
    if not Path(cfg.model).is_dir():
        raise UserError(f"--model {cfg.model} is not a directory (expected a diffusers Stable Diffusion folder)")
    method_cls.check_family(check_model_folder(cfg.model), cfg.model)
    if cfg.resolution is not None:
        check_image_size(cfg.resolution, cfg.model, "--resolution")
    method_cls.check_options_for_model(options, Path(cfg.model))


# What a resumed run must share with the run that wrote the checkpoints: they decide what is trained.
RESUME_FIXED = {"images": "--images", "vae": "--vae", "resolution": "--resolution", "placeholder": "--token", "method": "--method",
                "model": "--model", "gradient_accumulation_steps": "--gradient-accumulation-steps",
                "lr_scheduler": "--lr-scheduler", "lr_warmup_steps": "--lr-warmup-steps"}  # and every method option


def check_resume_config(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume with arguments that change what is trained (``RESUME_FIXED``) against the run's
    train_config.json, unless ``cfg.resume_with_changes``."""
    path = out / "train_config.json"
    if not path.exists():  # e.g. a checkpoint copied into a new folder
        warn(f"--resume: {out} has no train_config.json to compare the arguments with; resuming with these")
        return
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        if cfg.resume_with_changes:
            return
        raise UserError(f"--resume: cannot compare with the run's {path} ({describe_error(exc)}); pass "
                        "--resume-with-changes to resume anyway") from None
    changed = [(opt, saved.get(key), getattr(cfg, key)) for key, opt in RESUME_FIXED.items()
               if saved.get(key) != getattr(cfg, key)]
    if saved.get("method") == cfg.method:
        before = saved.get("options") if isinstance(saved.get("options"), dict) else {}
        changed += [(option_flag(key), before.get(key), value) for key, value in cfg.options.items()
                    if before.get(key) != value]
    if changed and not cfg.resume_with_changes:
        opt, before, now = changed[0]
        raise UserError(f"--resume: {opt} is {now!r}, the run in {out} was trained with {before!r} (recorded in "
                        f"{path.name}); resume with the same arguments, or pass --resume-with-changes to train on "
                        "with the change")
    for opt, before, now in changed:
        warn(f"--resume-with-changes: {opt} changes from {before!r} to {now!r}")


def check_finite(method, diverged_at: int | None, step: int, out: Path) -> None:
    """Stop a run whose loss or trained tensors went NaN or inf, before it saves them: one line naming the
    step and the last checkpoint, which is kept (nothing newer is written, no concept)."""
    bad = first_nonfinite(method.state_dict())
    if diverged_at is None and bad is None:
        return
    what = f"the loss was NaN or inf at step {diverged_at}" if diverged_at is not None else \
        f"{bad!r} holds NaN or inf at step {step}"
    kept = _checkpoint_dirs(out)
    safe = f"the last finite checkpoint, {kept[-1].name}, is kept" if kept else "no checkpoint was written"
    raise UserError(f"training diverged: {what}; {safe}; lower the learning rate (--lr) and train again")


def train(cfg: TrainConfig) -> Path:
    """Train and save a concept into ``cfg.out``; returns that folder. The main process holds the folder's
    lock for the whole run (``vico.files.output_folder``): a second run into it is refused in one line."""
    from accelerate import Accelerator

    from accelerate.utils import ProjectConfiguration

    from .files import output_folder

    check_tracking(cfg)
    logging_dir = cfg.logging_dir or os.path.join(cfg.out, "logs")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with=None if cfg.report_to == "none" else cfg.report_to,
                              project_config=ProjectConfiguration(project_dir=cfg.out, logging_dir=logging_dir))
    if not accelerator.is_main_process:
        return _train(cfg, accelerator)
    with output_folder(cfg.out, exclusive=False):
        return _train(cfg, accelerator)


def _train(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """The run on this process: checks, model, resume, stages, then the concept; returns the output folder."""
    cfg, method_cls, candidates = _checked_config(cfg, accelerator.is_main_process)
    out = Path(cfg.out)
    method, comps, images = _built_method(cfg, method_cls, accelerator.device)
    latents = _cached_latents(cfg, method, images, comps, accelerator)
    stages = method.stages(cfg.steps, cfg.batch_size)
    total = sum(s.steps for s in stages)
    generator = torch.Generator().manual_seed(cfg.seed)
    start, resume_state = _resume(candidates, method, generator, out, accelerator)
    if cfg.resume and not candidates:
        accelerator.print(f"vico: nothing to resume in {out}; starting fresh")
    if start >= total:  # finished, or killed between the last checkpoint and the final save
        if accelerator.is_main_process:
            _save_concept(method, out)
        accelerator.print(f"vico: {out} already finished ({start} of {total} steps); concept in {out}")
        return out
    if accelerator.is_main_process:
        _write_train_config(cfg, out)
    if cfg.report_to != "none":
        accelerator.init_trackers("vico", config=_tracker_config(cfg))
    try:
        _run_stages(_Run(cfg, accelerator, method, comps, generator, latents, out, start, total,
                         _validation_prompts(cfg, method)), stages, resume_state)
    finally:  # flush the trackers, also when interrupted (end_training would also end the process group)
        for tracker in accelerator.trackers:
            tracker.finish()
    accelerator.wait_for_everyone()
    _unwrap(accelerator, comps)
    if accelerator.is_main_process:
        _save_concept(method, out)
    return out


SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRACKERS = ("tensorboard", "wandb", "all", "none")


def check_schedule(cfg: TrainConfig) -> None:
    """One line for a bad accumulation count, schedule name or warm-up."""
    if type(cfg.gradient_accumulation_steps) is not int or cfg.gradient_accumulation_steps < 1:
        raise UserError(f"--gradient-accumulation-steps must be 1 or more, got {cfg.gradient_accumulation_steps}")
    if cfg.lr_scheduler not in SCHEDULES:
        raise UserError(f"--lr-scheduler {cfg.lr_scheduler!r}: choose one of {', '.join(SCHEDULES)}")
    if type(cfg.lr_warmup_steps) is not int or cfg.lr_warmup_steps < 0:
        raise UserError(f"--lr-warmup-steps must be 0 or more, got {cfg.lr_warmup_steps}")
    if cfg.lr_warmup_steps and cfg.lr_scheduler == "constant":
        raise UserError(f"--lr-warmup-steps {cfg.lr_warmup_steps}: the constant schedule has no warm-up; use "
                        "--lr-scheduler constant_with_warmup (or linear, cosine, ...)")


def check_tracking(cfg: TrainConfig) -> None:
    """One line for an unknown tracker or one whose package is not installed (before anything loads)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if cfg.report_to not in TRACKERS:
        raise UserError(f"--report-to {cfg.report_to!r}: choose one of {', '.join(TRACKERS)}")
    wanted = {"all": ("tensorboard", "wandb"), "none": ()}.get(cfg.report_to, (cfg.report_to,))
    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    missing = [name for name in wanted if not available[name]]
    if missing and (cfg.report_to != "all" or len(missing) == len(wanted)):
        raise UserError(f"--report-to {cfg.report_to}: {' and '.join(missing)} is not installed (pip install "
                        f"{' '.join(missing)})")


def check_validation(cfg: TrainConfig) -> None:
    """One line for empty validation prompts or non-positive validation numbers."""
    if cfg.validation_prompts is not None and (not cfg.validation_prompts
                                               or any(not p.strip() for p in cfg.validation_prompts)):
        raise UserError("--validation-prompt: a prompt must not be empty")
    for name, value in (("--validation-steps", cfg.validation_steps),
                        ("--num-validation-images", cfg.num_validation_images),
                        ("--validation-sample-steps", cfg.validation_sample_steps)):
        if value is not None and (type(value) is not int or value < 1):
            raise UserError(f"{name} must be 1 or more, got {value}")


def _validation_prompts(cfg: TrainConfig, method: Method) -> list[str]:
    """The prompts validation samples, or none when validation is off."""
    from .validation import default_prompts

    if cfg.validation_prompts is None and cfg.validation_steps is None:
        return []
    return list(cfg.validation_prompts) if cfg.validation_prompts else default_prompts(method)


def _tracker_config(cfg: TrainConfig) -> dict:
    """The run's arguments as tracker hyperparameters (numbers, text and booleans only)."""
    flat = {}
    for key, value in asdict(cfg).items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def _checked_config(cfg: TrainConfig, is_main: bool) -> tuple[TrainConfig, type[Method], list[Path]]:
    """Check the options and inputs before the model loads; returns the config with absolute paths and the
    resolution filled in, the method class and the checkpoints to resume from (newest first)."""
    if cfg.checkpoints_total_limit < 0:
        raise UserError(f"--checkpoints-total-limit must be 0 (keep all) or more, got {cfg.checkpoints_total_limit}")
    default = "; leave it out for the method's default"
    require_at_least_one({name: getattr(cfg, name) for name in ("steps", "batch_size", "checkpoint_every", "resolution")},
                         hints={"steps": default, "batch_size": default})
    check_output_folder(cfg.out)
    check_schedule(cfg)
    check_validation(cfg)
    # concept.json / train_config.json record where the model and images are: absolute, so that
    # `vico sample` works from any working directory
    cfg = replace(cfg, model=os.path.abspath(cfg.model), images=os.path.abspath(cfg.images),
                  vae=None if cfg.vae is None else os.path.abspath(check_vae(cfg.vae)))
    out = Path(cfg.out)
    if is_main:
        for path in remove_stale_temporaries(out):
            warn(f"removed {path}, left half-written by a killed run")
    checkpoints = _checkpoint_dirs(out)
    if checkpoints and not cfg.resume:
        raise UserError(f"{out} already has checkpoints; pass --resume to continue or choose another --out")
    # a named checkpoint that is not there fails here, before the model loads
    candidates = resume_candidates(out, cfg.resume, checkpoints) if cfg.resume else []
    method_cls = get_method(cfg.method)
    check_learning_rates(method_cls, cfg.learning_rates)
    options = method_options(method_cls, cfg.options)
    check_inputs(cfg, method_cls, options)  # against the model's configs, before it loads
    # what --resume compares: the resolution and every option, defaults filled in
    cfg = replace(cfg, resolution=cfg.resolution or native_size(cfg.model), options=asdict(options))
    if candidates:
        check_resume_config(cfg, out)
    return cfg, method_cls, candidates


def _built_method(cfg: TrainConfig, method_cls: type[Method], device: torch.device
                  ) -> tuple[Method, Components, torch.Tensor]:
    """Load the model and the training images (float [N, 3, R, R] in [-1, 1]) and make the method."""
    from accelerate.utils import set_seed

    comps = load_components(cfg.model, device=device, vae=cfg.vae)
    mcfg = MethodConfig(placeholder=cfg.placeholder, init_word=cfg.init_word, resolution=cfg.resolution,
                        seed=cfg.seed, options=method_options(method_cls, cfg.options),
                        learning_rates=dict(cfg.learning_rates))
    images = load_images(cfg.images, cfg.resolution)
    set_seed(cfg.seed)  # the new modules' initial weights
    method = method_cls(comps, mcfg)
    method.training_images = images  # pixels, for methods that augment before encoding (AttnDreamBooth)
    if cfg.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    return method, comps, images


LATENTS_FILE = "latents.safetensors"  # the encoded training images of a run, reused when it resumes


def _latents_key(cfg: TrainConfig, method: Method, comps: Components) -> str:
    """What the cached latents depend on: the image files' names and bytes, the resolution, the flipped copies,
    the VAE's config, dtype and weight files (name, size, modification time)."""
    import hashlib

    digest = hashlib.sha256()
    for path in list_images(cfg.images):
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    vae_files = sorted(p for p in Path(cfg.vae or Path(cfg.model) / "vae").iterdir() if p.is_file())
    digest.update(json.dumps([cfg.resolution, method.hflip_prob > 0, str(comps.vae.dtype), dict(comps.vae.config),
                              [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in vae_files]],
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _cached_latents(cfg: TrainConfig, method: Method, images: torch.Tensor, comps: Components,
                    accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images' latents (``_encoded_latents``), read from ``OUT/latents.safetensors`` when it was
    written for the same images, size and VAE (a resumed run), else encoded and written there by the main
    process. A stale file (images edited since) is encoded again, with a warning."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .files import atomic_write

    path, key = Path(cfg.out) / LATENTS_FILE, _latents_key(cfg, method, comps)
    device = accelerator.device
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as handle:
                if (handle.metadata() or {}).get("key") == key:
                    return handle.get_tensor("mean").to(device), handle.get_tensor("std").to(device)
            if accelerator.is_main_process:
                warn(f"{path} was encoded from other images, size or VAE than this run's (edited since?): "
                     "encoding the training images again")
        except Exception as exc:  # truncated or foreign: a cache, so encode again
            if accelerator.is_main_process:
                warn(f"{path} is unreadable ({describe_error(exc)}): encoding the training images again")
    mean, std = _encoded_latents(method, images, comps, device)
    if accelerator.is_main_process:
        tensors = {"mean": mean.detach().cpu().contiguous(), "std": std.detach().cpu().contiguous()}
        try:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"key": key}))
        except (UserError, OSError) as exc:  # only a cache: the run goes on (its checkpoints say if the disk is full)
            warn(f"{exc}; a resumed run will encode the training images again")
    return mean, std


def _encoded_latents(method: Method, images: torch.Tensor, comps: Components, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior mean and std of the images (doubled with flipped copies when the method flips),
    [N or 2N, 4, R/8, R/8] each: the VAE is frozen, so it encodes once."""
    with torch.no_grad():
        if method.hflip_prob > 0:
            images = torch.cat([images, images.flip(-1)])
        posterior = comps.vae.encode(images.to(device, comps.vae.dtype)).latent_dist
        sf = comps.vae.config.scaling_factor
        # contiguous, as read back from the cache: the same layout gives the same (bit-exact) training run
        return (posterior.mean * sf).contiguous(), (posterior.std * sf).contiguous()


def _resume(candidates: list[Path], method: Method, generator: torch.Generator, out: Path,
            accelerator: Accelerator) -> tuple[int, dict | None]:
    """Restore the newest readable candidate; returns its step and trainer state ((0, None) without one).
    Newer checkpoints are superseded; a different number of processes is warned about."""
    if not candidates:
        return 0, None
    path, state = _newest_readable(candidates, method, generator, out)
    start = int(state["step"])
    accelerator.print(f"vico: resuming from {path} (step {start})")
    if accelerator.is_main_process:
        for moved in supersede_newer(out, path):
            warn(f"moved {moved.name} to {moved.parent}: the run continues from {path.name}")
    accelerator.wait_for_everyone()
    saved_world = int(state.get("world_size", 1))
    if saved_world != accelerator.num_processes and accelerator.is_main_process:
        warn(f"{path.name} was written by a run on {saved_world} process(es), this one has "
             f"{accelerator.num_processes}: the global batch (per-process batch x processes) and the "
             "learning rates scaled by it change, so the run goes on from the same random stream but no "
             f"longer equals an uninterrupted {saved_world}-process run; launch {saved_world} processes "
             "(or keep the global batch with --batch-size) to continue it exactly")
    return start, state


def _newest_readable(candidates: list[Path], method: Method, generator: torch.Generator, out: Path
                     ) -> tuple[Path, dict]:
    """Load the first readable checkpoint of ``candidates`` (newest first), warning for each unreadable
    one; a one-line ``UserError`` when none is."""
    for i, path in enumerate(candidates):
        try:
            return path, _load_checkpoint(path, method, generator)
        except UnreadableFile as exc:
            if i == len(candidates) - 1:
                where = "the oldest" if len(candidates) > 1 else "the one named"
                raise UserError(f"no readable checkpoint in {out / CHECKPOINTS} ({where}: {exc}); move "
                                "that folder away to train afresh") from None
            warn(f"{exc}; falling back to the previous checkpoint, {candidates[i + 1].name}")
    raise ValueError("no checkpoint to resume from")  # the callers pass at least one


def _write_train_config(cfg: TrainConfig, out: Path) -> None:
    """Create ``out`` and write the run's arguments to train_config.json (what ``--resume`` compares)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {out}: {describe_error(exc)}") from None
    text = json.dumps(asdict(cfg), indent=1)
    atomic_write(out / "train_config.json", lambda p: p.write_text(text))


@dataclass
class _Run:
    """What every stage of one run reads, set up by ``_train``."""
    cfg: TrainConfig
    accelerator: Accelerator
    method: Method
    comps: Components
    generator: torch.Generator  # the one random stream of all processes
    latents: tuple[torch.Tensor, torch.Tensor]  # scaled posterior mean and std (``_encoded_latents``)
    out: Path
    start: int  # the step this run starts from (a resumed checkpoint's, else 0)
    total: int  # the steps of all stages
    validation_prompts: list[str]  # empty: no validation


def _run_stages(run: _Run, stages: list[Stage], resume_state: dict | None) -> None:
    """Train the stages, from ``run.start`` on, under one progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=run.total, initial=run.start, desc=run.method.name, file=sys.stderr,
               disable=not run.cfg.progress or not run.accelerator.is_local_main_process)
    completed, first, diverged_at = run.start, 0, None
    for index, stage in enumerate(stages):
        last = first + stage.steps
        if run.start < last:  # else finished before the checkpoint we resumed from
            optimizer, scheduler = _begin_stage(run, index, stage, resume_state if run.start > first else None)
            if len(stages) > 1:
                bar.set_description(f"{run.method.name} [{stage.name}]")
            completed, diverged_at = _train_stage(run, index, stage, (optimizer, scheduler),
                                                  range(max(run.start, first), last), bar, completed, diverged_at)
        first = last
    bar.close()


def _begin_stage(run: _Run, index: int, stage: Stage, resume_state: dict | None):
    """Switch the method to stage ``index``, wrap what trains in it and make its optimizer and learning-rate
    schedule, with the resumed states when ``resume_state`` (a checkpoint inside this stage) was written in it.
    Returns (optimizer, scheduler)."""
    from diffusers.optimization import get_scheduler

    # DDP fixes the trainable set when it wraps a module: unwrap, change the set, wrap again
    accelerator, method, cfg = run.accelerator, run.method, run.cfg
    scale_lr = method.scale_lr if cfg.scale_lr is None else cfg.scale_lr
    # the global batch: per-process batch x processes x accumulated batches
    lr_scale = stage.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps if scale_lr else 1.0
    _unwrap(accelerator, run.comps)
    method.begin_stage(index)
    groups = method.param_groups(lr_scale, stage=index)  # methods look modules up by name: before wrapping
    _wrap_trainable(accelerator, run.comps)
    adamw = torch.optim.AdamW(groups)
    # stepped once per optimizer step, by the loop (not through accelerate, which would step it per process)
    scheduler = get_scheduler(cfg.lr_scheduler, adamw, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=stage.steps)
    optimizer = accelerator.prepare(adamw)
    if resume_state is not None and int(resume_state.get("stage", 0)) == index:
        optimizer.load_state_dict(resume_state["optimizer"])
        if "scheduler" in resume_state:
            scheduler.load_state_dict(resume_state["scheduler"])
    return optimizer, scheduler


def _train_stage(run: _Run, index: int, stage: Stage, optimization: tuple, steps: range, bar, completed: int,
                 diverged_at: int | None) -> tuple[int, int | None]:
    """Train ``steps`` optimizer steps of stage ``index`` with ``optimization`` = (optimizer, scheduler),
    checkpointing every ``checkpoint_every`` steps and at the end, and on Ctrl-C; returns the steps completed
    and the first step whose loss was NaN or inf (None if none).

    Each step draws one global batch (per-process batch x processes x accumulated batches) from the run's
    generator; a process trains on its contiguous share of it, in ``gradient_accumulation_steps`` batches
    whose gradients accelerate accumulates (and averages over processes) before the optimizer steps."""
    accelerator, method, generator, cfg = run.accelerator, run.method, run.generator, run.cfg
    optimizer, scheduler = optimization
    world, rank, accumulate = accelerator.num_processes, accelerator.process_index, cfg.gradient_accumulation_steps
    share = stage.batch_size * accumulate
    global_batch, rows = share * world, slice(rank * share, (rank + 1) * share)
    gen_state, step = generator.get_state(), -1  # -1: no step of this stage begun
    trained = _trained_modules(run.comps)  # fixed for the stage (``_begin_stage``)
    try:
        for step in steps:
            gen_state, started = generator.get_state(), time.perf_counter()
            batch = method.make_batch(*run.latents, generator, global_batch, rows=rows)
            parts = []
            for j in range(accumulate):
                with accelerator.accumulate(*trained):
                    with accelerator.autocast():
                        loss, logs = method.training_loss(
                            batch.select(slice(j * stage.batch_size, (j + 1) * stage.batch_size)))
                    if diverged_at is None and not math.isfinite(float(loss.detach())):
                        diverged_at = step + 1
                    accelerator.backward(loss)  # divided by the accumulation count
                    parts.append(logs)
                    if accelerator.sync_gradients != (j == accumulate - 1):
                        raise RuntimeError("accelerate's accumulation counter is out of step with the batches")
                    if accelerator.sync_gradients:
                        with hold_interrupts():  # the weights, the schedule and the step counter move together
                            optimizer.step()
                            scheduler.step()
                            optimizer.zero_grad(set_to_none=True)
                            completed = step + 1
            logs = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
            _log_step(run, optimizer, logs, completed, time.perf_counter() - started)
            if completed % cfg.checkpoint_every == 0 or completed == run.total:
                _checkpoint(run, completed, optimization, index, diverged_at)
            if run.validation_prompts and (completed % (cfg.validation_steps or cfg.checkpoint_every) == 0
                                           or completed == run.total):
                _validate(run, completed)
    except KeyboardInterrupt:
        if accelerator.is_main_process and completed > run.start and diverged_at is None \
                and first_nonfinite(method.state_dict()) is None:
            if completed == step:  # interrupted inside a step: rewind its random draws
                generator.set_state(gen_state)
            path = save_checkpoint(run.out, completed, method, optimizer, generator, stage=index, world_size=world,
                                   scheduler=scheduler)
            print(f"vico: interrupted; saved {path}; continue with --resume", file=sys.stderr)
        raise
    return completed, diverged_at


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _trained_modules(comps: Components) -> list[torch.nn.Module]:
    """The modules (maybe DDP-wrapped) with something to train in this stage."""
    return [m for m in _trained_components(comps).values() if _trains(m)]


def _log_step(run: _Run, optimizer, logs: dict[str, float], step: int, seconds: float) -> None:
    """Send the loss (and its parts), each group's learning rate and the step time to the trackers."""
    if run.cfg.report_to == "none":
        return
    rates = {f"lr/{group.get('name', i)}": group["lr"] for i, group in enumerate(optimizer.param_groups)}
    run.accelerator.log({**{f"train/{k}": v for k, v in logs.items()}, **rates, "step_seconds": seconds},
                        step=step)


class _plain_modules:
    """Within the block ``comps`` holds the plain modules (DDP-free): sampling on one process must not run
    DDP's collective forward; the wrappers are put back after."""

    def __init__(self, accelerator, comps: Components):
        self.accelerator, self.comps = accelerator, comps

    def __enter__(self):
        self.saved = _trained_components(self.comps)
        for name, module in self.saved.items():
            setattr(self.comps, name, self.accelerator.unwrap_model(module))
        return self.comps

    def __exit__(self, *exc):
        for name, module in self.saved.items():
            setattr(self.comps, name, module)
        return False


def _validate(run: _Run, step: int) -> None:
    """Validation images at ``step`` on the main process (the others wait), to disk and to the trackers."""
    from .validation import write_validation

    accelerator, cfg = run.accelerator, run.cfg
    if accelerator.is_main_process:
        reference = run.method.training_images[0] if run.method.needs_reference else None
        with _plain_modules(accelerator, run.comps) as comps:
            folder, grid = write_validation(run.out, step, run.method, comps, run.validation_prompts,
                                            cfg.num_validation_images, cfg.validation_sample_steps, cfg.seed,
                                            reference)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": grid[None]}, step, dataformats="NHWC")
            else:
                tracker.log_images({"validation": [grid]}, step)
    accelerator.wait_for_everyone()


def _checkpoint(run: _Run, completed: int, optimization: tuple, index: int, diverged_at: int | None) -> None:
    """Stop a diverged run on every process, else save and prune checkpoints on the main one while the others
    wait. ``optimization``: (optimizer, scheduler)."""
    check_finite(run.method, diverged_at, completed, run.out)  # on every process: all of them stop
    if run.accelerator.is_main_process:
        optimizer, scheduler = optimization
        save_checkpoint(run.out, completed, run.method, optimizer, run.generator, stage=index,
                        world_size=run.accelerator.num_processes, scheduler=scheduler)
        prune_checkpoints(run.out, run.cfg.checkpoints_total_limit)
    run.accelerator.wait_for_everyone()  # no process runs ahead of a checkpoint being written

TRAINED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # where a method's trainable parameters live


def _trained_components(comps: Components) -> dict[str, torch.nn.Module]:
    """``TRAINED_COMPONENTS`` this model has (text_encoder_2: SDXL only), name -> module (maybe DDP-wrapped)."""
    return {name: getattr(comps, name) for name in TRAINED_COMPONENTS if getattr(comps, name) is not None}


def _unwrap(accelerator, comps) -> None:
    """Put the plain modules back into ``comps`` and drop accelerate's references to the wrappers."""
    accelerator.free_memory()
    for name, module in _trained_components(comps).items():
        setattr(comps, name, accelerator.unwrap_model(module))


def _wrap_trainable(accelerator, comps) -> None:
    """Hand accelerate the modules that train in this stage (DDP on several processes). A module
    with nothing to train stays plain: DDP refuses one, and it needs no gradient averaging."""
    for name, module in _trained_components(comps).items():
        if _trains(module):
            setattr(comps, name, accelerator.prepare(module))


def _save_concept(method, out: Path) -> None:
    try:
        method.save(out)
    except UserError as exc:
        raise UserError(f"{exc}; the checkpoints in {out / CHECKPOINTS} are intact: rerun with --resume to write "
                        "the concept") from None
