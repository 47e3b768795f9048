"""Per-stage diagnosis of a method's recipe on the toy world: how far each stage moves its parameters, and what
its samples show after it.

    python benchmarks/toy_stage_probe.py --model vico/toyworld/model --out DIR --method attndreambooth \\
        [--concept 0] [--samples 2] [--steps N] [--batch-size B] [--lr NAME=VALUE ...] [--every N]

Trains (or, when DIR has the finished run, reuses) one concept of ``demo.CONCEPTS`` keeping a checkpoint at the end of every stage (single-stage methods:
every ``--every`` steps), then for each checkpoint prints the relative change of each parameter group
(||theta_k - theta_{k-1}|| / ||theta_{k-1}||, against the method's initial state for the first) and the
checker's read of ``--samples`` images per background (identity shape/colour/texture, text background, and
which colours and textures were drawn). Writes DIR/probe.json and DIR/samples-STEP.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vico.toyworld import checker, world  # noqa: E402
from vico.toyworld.demo import CONCEPTS, concept_scenes, prompt, summary, write_concept_images  # noqa: E402


def group_of(name: str) -> str:
    """Parameter group of a saved tensor name: the [V]/S* embedding, the UNet's text cross-attention, the
    rest of the UNet, or the tensor's own kind (CatVersion's prefix keys/values, ViCo's image blocks)."""
    if name.startswith("unet."):
        return "unet attn2" if ".attn2." in name else "unet other"
    return name.rsplit(".", 1)[-1] if "prefix" in name else name.split(".", 1)[0]


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Group -> ||after - before|| / ||before|| over the group's tensors (float64)."""
    num: Counter = Counter()
    den: Counter = Counter()
    for name, b in before.items():
        g = group_of(name)
        num[g] += float((after[name].double() - b.double()).pow(2).sum())
        den[g] += float(b.double().pow(2).sum())
    return {g: math.sqrt(num[g]) / max(math.sqrt(den[g]), 1e-30) for g in sorted(den)}


def initial_state(model: Path, method: str, concept, lrs: dict, options: dict) -> dict[str, torch.Tensor]:
    """The method's trainable tensors before step 0 (built as ``vico.training.train`` builds them)."""
    from accelerate.utils import set_seed

    from vico.methods import get_method
    from vico.methods.base import MethodConfig, method_options
    from vico.model import load_components

    comps = load_components(str(model))
    set_seed(0)
    cls = get_method(method)
    m = cls(comps, MethodConfig(init_word=concept.shape, resolution=comps.native_resolution,
                                options=method_options(cls, options), learning_rates=dict(lrs)))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def score(model: Path, concept_dir: Path, concept, samples: int, guidance: float, png: Path, images_dir: Path) -> dict:
    """Checker summary of ``samples`` images per background, plus what colours/textures were drawn; the
    images go to ``png`` (one row per background). A method that samples from a reference image (ViCo) gets
    the first training image of ``images_dir``, as ``vico sample`` does."""
    import numpy as np
    from PIL import Image

    from vico.pipeline import ViCoPipeline

    pipe = ViCoPipeline.from_pretrained(model, concept_dir)
    reference = pipe.default_reference(images_dir) if pipe.method.needs_reference else None
    rows, drawn, grid = [], {"colour": Counter(), "texture": Counter()}, []
    for i, bg in enumerate(world.BACKGROUNDS):
        images, _ = pipe(prompt(pipe.method, concept, bg), reference=reference, num_images=samples,
                         num_inference_steps=30, seed=i, progress=False, guidance_scale=guidance)
        grid.append(np.concatenate(list(images), axis=1))
        for img in images:
            got = checker.read(img)
            drawn["colour"][got["colour"]] += 1
            drawn["texture"][got["texture"]] += 1
            rows.append(dict(background=got["background"] == bg, shape=got["shape"] == concept.shape,
                             colour=got["colour"] == concept.colour, texture=got["texture"] == concept.texture))
    Image.fromarray(np.concatenate(grid)).resize((32 * 4 * samples, 32 * 4 * len(grid)), Image.NEAREST).save(png)
    return dict(summary(rows), n=len(rows), drawn={k: dict(v) for k, v in drawn.items()})


def main(argv=None) -> int:
    from vico.methods import get_method
    from vico.training import CHECKPOINTS, TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--method", required=True)
    p.add_argument("--concept", type=int, default=0, help=f"index into demo.CONCEPTS (0..{len(CONCEPTS) - 1})")
    p.add_argument("--samples", type=int, default=2, help="images per background at every checkpoint")
    p.add_argument("--steps", type=int, help="steps (per stage for multi-stage methods); default the method's")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--scale-lr", choices=("yes", "no"))
    p.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--option", action="append", default=[], metavar="FIELD=JSON",
                   help="method option by field name, e.g. rotate_p=0 (repeatable)")
    p.add_argument("--every", type=int, help="checkpoint spacing for single-stage methods (default: steps / 4)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--lr-scheduler", default="constant", help="a diffusers get_scheduler name, over each stage")
    o = p.parse_args(argv)
    concept = CONCEPTS[o.concept]
    lrs = {k: float(v) for k, v in (s.split("=", 1) for s in o.lr)}
    options = {k: json.loads(v) for k, v in (s.split("=", 1) for s in o.option)}
    cls = get_method(o.method)
    images = o.out / "images"
    write_concept_images(images, concept_scenes(concept))
    table = getattr(sys.modules[cls.__module__], "STAGES", None) if o.method == "attndreambooth" else None
    stage_steps = [o.steps or spec[1] for spec in table.values()] if table else [o.steps or cls.default_steps]
    ends = list(itertools.accumulate(stage_steps))
    every = math.gcd(*ends) if len(ends) > 1 else (o.every or max(ends[0] // 4, 1))
    run = o.out / "run"
    train(TrainConfig(model=str(o.model), images=str(images), out=str(run), method=o.method, init_word=concept.shape,
                      steps=o.steps, batch_size=o.batch_size, learning_rates=lrs, options=options, checkpoint_every=every,
                      checkpoints_total_limit=0, progress=False, resume=True, lr_scheduler=o.lr_scheduler,
                      scale_lr=None if o.scale_lr is None else o.scale_lr == "yes"))
    from vico.methods.base import read_concept

    marks = ends if len(ends) > 1 else list(range(every, ends[0] + 1, every))
    before, report = initial_state(o.model, o.method, concept, lrs, options), []
    for step in marks:
        ckpt = run / CHECKPOINTS / f"step-{step:06d}"
        _, after = read_concept(ckpt)
        entry = dict(step=step, moved=relative_change(before, after), **score(o.model, ckpt, concept, o.samples, o.guidance,
                                                                               o.out / f"samples-{step:06d}.png", images))
        report.append(entry)
        print(json.dumps(entry), flush=True)
        before = after
    (o.out / "probe.json").write_text(json.dumps(dict(concept=concept.name, method=o.method, steps=stage_steps,
                                                      lrs=lrs, options=options, batch_size=o.batch_size,
                                                      lr_scheduler=o.lr_scheduler, report=report), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
