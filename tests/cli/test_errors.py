"""The CLI as a new user meets it (issue 16, items 10-14): portable concepts, safe checkpoints,
one-line errors checked before any work, no silent surprises, a re-runnable demo."""

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests import builders as tiny  # noqa: E402
from vico import cli  # noqa: E402
from tests.builders import error_line, signal_handlers_kept, vico as run, vico_train as train  # noqa: E402
from vico.data import load_image  # noqa: E402


def sample(concept, out, *extra, prompt="a photo of S*"):
    return run("sample", "--concept", concept, "--prompt", prompt, "--out", out, "--num-images", 1, "--steps", 1,
               "--quiet", *extra)


@pytest.fixture(scope="module")
def trained(model_dir, images_dir, tmp_path_factory):
    """A ViCo concept trained with *relative* --model/--images paths (2 steps, a checkpoint each step)."""
    work = tmp_path_factory.mktemp("work")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with signal_handlers_kept():
            assert train(os.path.relpath(model_dir), os.path.relpath(images_dir), "concept", "--steps", 2,
                         "--checkpoint-every", 1) == 0
    finally:
        os.chdir(cwd)
    return work / "concept"


@pytest.fixture(scope="module")
def ti_concept(model_dir, images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "concept"
    with signal_handlers_kept():
        assert train(model_dir, images_dir, out, "--method", "textual-inversion", "--steps", 1) == 0
    return out


def copy_concept(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "concept"
    shutil.copytree(src, dst)
    return dst


# --- 10: portable concepts ------------------------------------------------------------------------


def test_concept_records_absolute_paths_and_samples_from_another_directory(trained, tmp_path, monkeypatch):
    meta = json.loads((trained / "concept.json").read_text())
    cfg = json.loads((trained / "train_config.json").read_text())
    assert os.path.isabs(meta["base_model"]) and Path(meta["base_model"], "unet").is_dir()
    assert os.path.isabs(cfg["images"]) and Path(cfg["images"]).is_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert sample(os.path.relpath(trained), "samples") == 0
    assert (elsewhere / "samples" / "000.png").is_file()


def test_sample_names_a_missing_model_or_image_folder_and_overrides_work(trained, model_dir, images_dir,
                                                                         tmp_path, capsys):
    concept = copy_concept(trained, tmp_path)
    meta = json.loads((concept / "concept.json").read_text())
    meta["base_model"] = str(tmp_path / "moved-away-sd")
    (concept / "concept.json").write_text(json.dumps(meta))
    assert sample(concept, tmp_path / "s1") == 2
    line = error_line(capsys)
    assert str(tmp_path / "moved-away-sd") in line and "--model" in line
    assert sample(concept, tmp_path / "s2", "--model", model_dir) == 0

    cfg = json.loads((concept / "train_config.json").read_text())
    cfg["images"] = str(tmp_path / "moved-away-images")
    (concept / "train_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert sample(concept, tmp_path / "s3", "--model", model_dir) == 2
    line = error_line(capsys)
    assert str(tmp_path / "moved-away-images") in line and "--reference" in line
    reference = sorted(Path(images_dir).iterdir())[0]
    assert sample(concept, tmp_path / "s4", "--model", model_dir, "--reference", reference) == 0


# --- 11: checkpoints ---------------------------------------------------------------------------------


class _TinyMethod:
    def save(self, folder):
        from vico.files import atomic_write

        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(folder) / "concept.safetensors", lambda p: p.write_bytes(b"weights"))


def test_checkpoint_is_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    from vico import training

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    final = training.save_checkpoint(tmp_path, 3, _TinyMethod(), opt, torch.Generator(), stage=0)
    assert (final / "trainer.pt").is_file() and (final / "concept.safetensors").is_file()
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = events[rename][1]
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {f"{tmp}/trainer.pt", f"{tmp}/concept.safetensors", tmp} <= synced_before
    assert ("fsync", str(tmp_path / "checkpoints")) in events[rename:]


def test_stale_temporaries_of_a_killed_run_are_removed_on_start(model_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "run"
    dead = 99999999  # no such process
    (out / "checkpoints" / f".tmp-step-000005-{dead}").mkdir(parents=True)
    (out / "checkpoints" / f".tmp-step-000005-{dead}" / "trainer.pt").write_bytes(b"half")
    (out / f".concept.safetensors.tmp{dead}").write_bytes(b"half")
    alive = out / "checkpoints" / f".tmp-step-000007-{os.getppid()}"  # a live writer's: kept
    alive.mkdir()
    assert train(model_dir, images_dir, out, "--steps", 1) == 0
    assert not (out / "checkpoints" / f".tmp-step-000005-{dead}").exists()
    assert not (out / f".concept.safetensors.tmp{dead}").exists()
    assert alive.is_dir()
    assert "half-written" in capsys.readouterr().err


@pytest.mark.parametrize("fault", ["torch-runtime", "enospc", "read-only"])
def test_full_disk_or_read_only_checkpoint_is_one_line(fault, model_dir, images_dir, tmp_path, monkeypatch,
                                                       capsys):
    import safetensors.torch

    from vico import training

    if fault == "torch-runtime":  # what torch.save says when the disk fills mid-write
        def broken(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 320 vs 254")
        monkeypatch.setattr(training.torch, "save", broken)
    else:
        code = errno.ENOSPC if fault == "enospc" else errno.EROFS

        def broken(tensors, filename, *a, **k):
            raise OSError(code, os.strerror(code), filename)
        monkeypatch.setattr(safetensors.torch, "save_file", broken)
    out = tmp_path / "run"
    assert train(model_dir, images_dir, out, "--steps", 2, "--checkpoint-every", 1) == 2
    line = error_line(capsys)
    assert str(out / "checkpoints") in line and "--resume" in line
    assert "Traceback" not in line
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_interrupt_between_optimizer_step_and_counter_saves_the_right_step(model_dir, images_dir, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    reference = tmp_path / "reference"
    assert train(model_dir, images_dir, reference, "--steps", 3, "--checkpoint-every", 1) == 0
    calls = []

    def sigterm_after_second_step(optimizer, args, kwargs):
        calls.append(1)
        if len(calls) == 2:  # the weights have moved; the step counter has not
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "interrupted"
    handle = register_optimizer_step_post_hook(sigterm_after_second_step)
    try:
        assert train(model_dir, images_dir, out, "--steps", 3, "--checkpoint-every", 100) == 130
    finally:
        handle.remove()
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-000002"]  # the post-step weights under the step they belong to
    got = load_file(out / "checkpoints" / "step-000002" / "concept.safetensors")
    want = load_file(reference / "checkpoints" / "step-000002" / "concept.safetensors")
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert train(model_dir, images_dir, out, "--steps", 3, "--resume") == 0
    a, b = load_file(out / "concept.safetensors"), load_file(reference / "concept.safetensors")
    for k in b:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("broken", ["concept.safetensors", "trainer.pt"])
def test_resume_falls_back_from_a_corrupt_newest_checkpoint(broken, trained, model_dir, images_dir, tmp_path,
                                                            capsys):
    out = copy_concept(trained, tmp_path)
    newest = out / "checkpoints" / "step-000002" / broken
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    (out / "concept.safetensors").unlink()
    assert train(model_dir, images_dir, out, "--steps", 2, "--resume") == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "falling back" in text and "step-000001" in text and broken in text
    a, b = load_file(out / "concept.safetensors"), load_file(trained / "concept.safetensors")
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_every_checkpoint_corrupt_is_one_line(trained, model_dir, images_dir, tmp_path, capsys):
    out = copy_concept(trained, tmp_path)
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "trainer.pt").write_bytes(b"garbage")
    assert train(model_dir, images_dir, out, "--steps", 3, "--resume") == 2
    assert "no readable checkpoint" in error_line(capsys)


# --- 12: one-line errors, checked before any work -------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 0])
def test_bad_step_counts_are_one_line_before_loading_anything(value, tmp_path, capsys):
    missing = tmp_path / "no-such-model"  # were the model loaded first, the error would name it
    assert run("train", "--model", missing, "--images", tmp_path, "--out", tmp_path / "o", "--steps", value) == 2
    assert f"--steps must be at least 1, got {value}" in error_line(capsys)
    assert run("sample", "--concept", tmp_path, "--prompt", "S*", "--out", tmp_path / "s", "--steps", value) == 2
    assert "--steps must be at least 1" in error_line(capsys)
    assert run("sample", "--concept", tmp_path, "--prompt", "S*", "--out", tmp_path / "s",
               "--num-images", value) == 2
    assert "--num-images must be at least 1" in error_line(capsys)
    assert run("demo", "--out", tmp_path / "d", "--steps", value) == 2
    assert "--steps must be at least 1" in error_line(capsys)


@pytest.mark.parametrize("case", ["truncated-weights", "garbage-weights", "truncated-json", "json-list",
                                  "json-keys"])
def test_garbage_concept_files_are_one_line(case, trained, tmp_path, capsys):
    concept = copy_concept(trained, tmp_path)
    weights, config = concept / "concept.safetensors", concept / "concept.json"
    if case == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif case == "garbage-weights":
        weights.write_bytes(b"\x00garbage" * 20)
    elif case == "truncated-json":
        config.write_text(config.read_text()[:40])
    elif case == "json-list":
        config.write_text("[1, 2]")
    else:
        meta = json.loads(config.read_text())
        meta["config"]["not_a_field"] = 1
        config.write_text(json.dumps(meta))
    assert sample(concept, tmp_path / "s") == 2
    line = error_line(capsys)
    name = "concept.safetensors" if "weights" in case else "concept.json"
    assert str(concept / name) in line
    assert {"truncated-weights": "truncated", "garbage-weights": "not a safetensors file",
            "truncated-json": "not valid JSON", "json-list": "not a vico concept file",
            "json-keys": "unknown config keys"}[case] in line


def test_out_that_is_a_file_is_refused_before_any_work(trained, model_dir, images_dir, tmp_path, monkeypatch,
                                                       capsys):
    from vico import pipeline, training

    def must_not_run(*a, **k):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(training, "load_components", must_not_run)
    monkeypatch.setattr(pipeline.ViCoPipeline, "from_pretrained", must_not_run)
    afile = tmp_path / "a-file"
    afile.write_text("mine")
    assert train(model_dir, images_dir, afile, "--steps", 1) == 2
    assert "is an existing file" in error_line(capsys)
    assert sample(trained, afile) == 2
    assert "is an existing file" in error_line(capsys)
    assert run("demo", "--out", afile, "--model", model_dir, "--images", images_dir) == 2
    assert "is an existing file" in error_line(capsys)
    assert train(model_dir, images_dir, afile / "sub", "--steps", 1) == 2
    assert "is a file, not a folder" in error_line(capsys)
    assert afile.read_text() == "mine"


def test_eval_with_an_empty_or_wrong_encoder_folder_is_one_line(tmp_path, capsys):
    clip, dino = tiny.save_tiny_clip(tmp_path / "clip"), tiny.save_tiny_dino(tmp_path / "dino")
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["eval", "--generated", tmp_path / "gen", "--class-word", "cat", "--real", tmp_path]
    cases = [
        (["--clip", empty], "has no config.json"),
        (["--clip", tmp_path / "missing"], "is not a folder"),
        (["--clip", dino], "holds a 'vit' model, not a CLIPModel"),
        (["--clip", clip, "--dino", clip], "holds a 'clip' model, not a ViTModel"),
        (["--clip", clip, "--dino", empty], "has no config.json"),
    ]
    for extra, message in cases:
        assert run(*base, *extra) == 2
        assert message in error_line(capsys), extra
    (tmp_path / "nowt").mkdir()
    shutil.copy(clip / "config.json", tmp_path / "nowt" / "config.json")
    assert run(*base, "--clip", tmp_path / "nowt") == 2
    assert "has no weights" in error_line(capsys)


# --- 13: no silent surprises ------------------------------------------------------------------------------


def test_prompt_without_the_concepts_token_warns(trained, tmp_path, capsys):
    assert sample(trained, tmp_path / "s", prompt="a photo of a cat on the beach") == 0
    err = capsys.readouterr().err
    assert "vico: warning:" in err and "does not contain the concept's token 'S*'" in err
    assert sample(trained, tmp_path / "s2") == 0
    assert "does not contain" not in capsys.readouterr().err


def test_save_maps_on_a_method_without_maps_says_so(ti_concept, tmp_path, capsys):
    assert sample(ti_concept, tmp_path / "s", "--save-maps") == 0
    assert "--save-maps: textual-inversion has no attention maps" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "s").iterdir() if "_map_" in p.name]


def test_rgba_images_are_composited_on_white(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)  # transparent black everywhere...
    rgba[8:24, 8:24] = (255, 0, 0, 255)  # ...but an opaque red square
    rgba[0:4, 0:4] = (0, 0, 255, 128)  # and a half-transparent blue corner
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    img = (load_image(tmp_path / "x.png", 32) + 1) * 127.5
    assert torch.allclose(img[:, 30, 30], torch.tensor([255.0, 255.0, 255.0]), atol=1)  # white, not black
    assert torch.allclose(img[:, 16, 16], torch.tensor([255.0, 0.0, 0.0]), atol=1)
    assert torch.allclose(img[:, 1, 1], torch.tensor([127.0, 127.0, 255.0]), atol=2)
    Image.fromarray(rgba[..., :2].copy(), "LA").save(tmp_path / "la.png")
    assert torch.allclose((load_image(tmp_path / "la.png", 32) + 1)[:, 30, 30] * 127.5, torch.tensor(255.0),
                          atol=1)


def test_far_from_square_or_small_images_warn(tmp_path, capsys):
    for name, (w, h) in {"wide": (96, 32), "small": (16, 16), "fine": (40, 32)}.items():
        Image.new("RGB", (w, h), (10, 20, 30)).save(tmp_path / f"{name}.png")
    load_image(tmp_path / "wide.png", 32)
    assert "wide.png is 96x32, far from square" in capsys.readouterr().err
    load_image(tmp_path / "small.png", 32)
    assert "small.png is 16x16, smaller than the model's 32x32" in capsys.readouterr().err
    load_image(tmp_path / "fine.png", 32)
    assert capsys.readouterr().err == ""


# --- 14: the README's main command runs twice --------------------------------------------------------------


def test_demo_on_a_given_model_runs_twice_into_the_same_folder(model_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "vico-demo"
    argv = ["demo", "--out", out, "--model", model_dir, "--images", images_dir, "--init-word", "cat", "--steps", 1,
            "--sample-steps", 1, "--num-images", 1, "--quiet"]
    assert run(*argv) == 0
    first = (out / "concept" / "concept.safetensors").stat().st_mtime_ns
    assert run(*argv) == 0  # its own previous output is replaced, not refused
    assert (out / "concept" / "concept.safetensors").stat().st_mtime_ns != first
    assert (out / "samples" / "grid.png").is_file()
    assert (out / ".vico-written").is_file()  # what lets the next run replace it


def test_demo_never_deletes_a_folder_it_did_not_write(model_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "concept").mkdir(parents=True)
    (out / "concept" / "precious.txt").write_text("keep me")
    assert run("demo", "--out", out, "--model", model_dir, "--images", images_dir, "--steps", 1, "--quiet") == 2
    assert "which vico did not write there" in error_line(capsys)
    assert (out / "concept" / "precious.txt").read_text() == "keep me"


def test_demo_options_that_would_be_ignored_are_refused(model_dir, tmp_path, capsys):
    assert run("demo", "--out", tmp_path / "d", "--init-word", "dog") == 2
    assert "--init-word and --num-images apply with --model" in error_line(capsys)
    assert run("demo", "--out", tmp_path / "d", "--model", model_dir) == 2
    assert "--model and --images go together" in error_line(capsys)
    assert run("demo", "--out", tmp_path / "d", "--model", model_dir, "--images", tmp_path, "--arch", "sdxl") == 2
    assert "--arch picks a shipped toy model" in error_line(capsys)
    assert not (tmp_path / "d").exists()


def test_demo_without_the_shipped_model_of_its_arch_is_one_line(tmp_path, capsys, monkeypatch):
    from vico.toyworld import demo

    monkeypatch.setitem(demo.SHIPPED_MODELS, "sdxl", "no-such-model")
    assert run("demo", "--out", tmp_path / "d", "--arch", "sdxl") == 2
    assert "no sdxl toy-world model (vico/toyworld/no-such-model/model_index.json)" in error_line(capsys)
    assert not (tmp_path / "d").exists()


def test_demo_help_describes_what_it_runs(capsys):
    from vico.toyworld import demo

    with pytest.raises(SystemExit):
        run("demo", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("toy-world model", "vico/toyworld/model", "ViCo and with Textual Inversion", "five renders",
                   "OUT/grid.png", "OUT/metrics.json", "--model PATH --images DIR", "local Stable Diffusion"):
        assert phrase in text, phrase
    assert "random" not in text and "default cat" not in text
    assert (f"default on the toy model: {demo.VICO_STEPS} for ViCo, {demo.TI_STEPS} for Textual Inversion, batch "
            f"{demo.TOY_RECIPES['vico']['batch_size']}") in text
    assert {r["batch_size"] for r in demo.TOY_RECIPES.values()} == {4}


def test_eval_with_a_garbage_concept_json_is_one_line(tmp_path, capsys):

    concept = tmp_path / "concept"
    concept.mkdir()
    (concept / "concept.json").write_text("{not json")
    code = cli.main(["eval", "--concept", str(concept), "--generated", str(tmp_path), "--clip", str(tmp_path),
                     "--dino", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "concept.json" in err
