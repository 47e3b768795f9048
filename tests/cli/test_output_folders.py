"""Output folders: one process at a time, new output moved into place, only vico's own earlier output replaced,
no write through a symlink, no stale image left for `vico eval` to score."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from tests.builders import error_line, signal_handlers_kept, vico as run  # noqa: E402
from vico.files import LOCK_FILE, WRITTEN_FILE, output_folder  # noqa: E402
from vico.model import UserError  # noqa: E402


@pytest.fixture(scope="module")
def concept(model_dir, images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("concept") / "c"
    with signal_handlers_kept():
        assert run("train", "--model", model_dir, "--images", images_dir, "--out", out, "--init-word", "cat",
                   "--steps", 1, "--quiet") == 0
    return out


def sample(concept, out, n=1, *extra):
    return run("sample", "--concept", concept, "--prompt", "a photo of S*", "--out", out, "--num-images", n,
               "--steps", 1, "--quiet", *extra)


def held(folder: Path):
    """``folder``'s lock held the way a running vico command holds it (here, by this process: ``flock`` locks
    belong to open files, so the CLI called below still finds it held)."""
    from fused._locks import exclusive_lock

    folder.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(folder / LOCK_FILE)


def test_a_second_train_into_a_held_folder_is_refused_before_any_work(model_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with held(out):
        code = run("train", "--model", model_dir, "--images", images_dir, "--out", out, "--init-word", "cat",
                   "--steps", 1, "--quiet")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written, no train_config.json
    assert code == 2
    assert f"--out {out} is in use by another vico process (pid {os.getpid()})" in error_line(capsys)


def test_the_lock_of_a_killed_process_is_taken_over(model_dir, images_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(out / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        print('locked', flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)  # its PID is still in the file
    assert run("train", "--model", model_dir, "--images", images_dir, "--out", out, "--init-word", "cat",
               "--steps", 1, "--quiet") == 0
    assert (out / "concept.safetensors").is_file() and not (out / LOCK_FILE).exists()


def test_sample_into_a_held_folder_is_refused(concept, tmp_path, capsys):
    out = tmp_path / "samples"
    with held(out):
        assert sample(concept, out) == 2
    assert f"in use by another vico process (pid {os.getpid()})" in error_line(capsys)
    assert not (out / "000.png").exists()


def test_resampling_a_folder_leaves_no_stale_image_or_map(concept, tmp_path):
    out = tmp_path / "samples"
    assert sample(concept, out, 3, "--save-maps") == 0
    assert {"002.png", "grid.png", "prompt.txt"} <= {p.name for p in out.iterdir()}
    assert any(out.glob("002_mask_*.png"))
    assert sample(concept, out, 1) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [WRITTEN_FILE, "000.png", "grid.png", "prompt.txt"]  # no 001/002, no maps of the first run
    assert json.loads((out / WRITTEN_FILE).read_text()) == ["000.png", "grid.png", "prompt.txt"]
    from vico.metrics import read_images

    assert len(read_images(out)) == 1  # what `vico eval --generated` scores


def test_sample_refuses_a_folder_with_files_vico_did_not_write(concept, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "005.png").write_bytes(b"my own picture")
    assert sample(concept, out) == 2
    assert f"--out {out} holds 005.png, which vico did not write there" in error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["005.png"]
    assert (out / "005.png").read_bytes() == b"my own picture"


def test_sample_never_writes_through_a_symlink_it_recorded(concept, tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"outside the folder")
    out = tmp_path / "samples"
    assert sample(concept, out) == 0
    (out / "000.png").unlink()
    (out / "000.png").symlink_to(victim)  # e.g. swapped in after the first run
    (out / "grid.png").unlink()
    (out / "grid.png").symlink_to(tmp_path)  # a link to a folder: unlinked, never descended into
    written = json.loads((out / WRITTEN_FILE).read_text())
    (out / WRITTEN_FILE).write_text(json.dumps(written + ["../victim.png", "/etc/passwd"]))
    assert sample(concept, out) == 0
    assert victim.read_bytes() == b"outside the folder"
    assert not (out / "000.png").is_symlink() and (out / "000.png").stat().st_size > 100
    assert not (out / "grid.png").is_symlink() and (tmp_path / "victim.png").exists()


def test_eval_out_refuses_a_file_vico_did_not_write(tmp_path, capsys):
    report = tmp_path / "concept.json"
    report.write_text('{"precious": true}')
    (tmp_path / "gen").mkdir()
    code = run("eval", "--clip", tmp_path / "no-clip", "--generated", tmp_path / "gen", "--class-word", "cat",
               "--real", tmp_path / "gen", "--out", report)
    assert code == 2
    assert f"--out {report} exists and was not written by vico; refusing to replace it" in error_line(capsys)
    assert report.read_text() == '{"precious": true}'


def test_commit_replaces_only_vicos_own_entries(tmp_path):
    with output_folder(tmp_path / "o") as folder:
        for name in ("a.png", "b.png"):
            (folder.staging() / name).write_text(name)
        folder.commit()
    with output_folder(tmp_path / "o") as folder:
        (folder.staging() / "c.png").write_text("c")
        folder.commit()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [WRITTEN_FILE, "c.png"]
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("mine")
    for text in ("1", "2"):
        with output_folder(shared, exclusive=False) as folder:
            folder.check_replaceable("report.json")
            (folder.staging() / "report.json").write_text(text)
            folder.commit()
    assert (shared / "report.json").read_text() == "2" and (shared / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="notes.txt exists and was not written by vico"):
        with output_folder(shared, exclusive=False) as folder:
            folder.check_replaceable("notes.txt")


def test_a_failed_run_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with output_folder(out) as folder:
            (folder.staging() / "000.png").write_text("half")
            raise RuntimeError("killed")
    assert not out.exists()  # created by the run, removed again
    with output_folder(tmp_path / "o") as folder:
        (folder.staging() / "a.png").write_text("a")
        folder.commit()
    os.mkdir(tmp_path / "o" / ".vico-tmp-999999")  # a killed run's staging
    with pytest.raises(RuntimeError):
        with output_folder(tmp_path / "o") as folder:
            (folder.staging() / "b.png").write_text("b")
            raise RuntimeError("killed")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [WRITTEN_FILE, "a.png"]


def test_hidden_files_do_not_block_and_a_file_that_appears_mid_run_is_kept(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".DS_Store").write_text("a file manager's")
    with output_folder(out) as folder:  # hidden entries are not output: no refusal
        (folder.staging() / "000.png").write_text("new")
        (out / "grid.png").write_text("the user's, written during the run")
        (folder.staging() / "grid.png").write_text("new")
        with pytest.raises(UserError, match="grid.png exists and was not written by vico"):
            folder.commit()
    assert (out / "grid.png").read_text() == "the user's, written during the run"
    assert (out / ".DS_Store").read_text() == "a file manager's" and not (out / "000.png").exists()
