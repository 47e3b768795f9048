"""JIT build of the C++ kernels: cache key and the error when no compiler exists."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from fused import _cpp, _dispatch


def test_build_cache_key_tracks_sources_and_versions(monkeypatch, tmp_path):
    key = _cpp.cache_key(_cpp.CPU_SOURCES + _cpp.CPU_HEADERS)
    assert torch.__version__.replace("+", "_") in key and (torch.version.cuda or "cpu") in key
    fake_src = tmp_path / "csrc"
    fake_src.mkdir()
    for name in _cpp.CPU_SOURCES + _cpp.CPU_HEADERS:
        (fake_src / name).write_bytes((_cpp.source_dir() / name).read_bytes())
    monkeypatch.setattr(_cpp, "source_dir", lambda: fake_src)
    assert _cpp.cache_key(_cpp.CPU_SOURCES + _cpp.CPU_HEADERS) == key
    (fake_src / "otsu_cpu.cpp").write_text("// changed\n")
    assert _cpp.cache_key(_cpp.CPU_SOURCES + _cpp.CPU_HEADERS) != key


def test_missing_compiler_gives_clear_error(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("FUSED_CACHE_DIR", str(tmp_path))
    with pytest.raises(_cpp.BuildError, match="C\\+\\+17 compiler"):
        _cpp._build("fused_cpp", _cpp.CPU_SOURCES, _cpp.CPU_HEADERS)


class FakeLoad:
    """Stands in for ``cpp_extension.load``: "builds" by writing the library file, and counts builds."""

    def __init__(self, content=b"\x7fELF fake library"):
        self.calls, self.content = 0, content

    def __call__(self, name, build_directory, **kwargs):
        from pathlib import Path

        assert not (Path(build_directory) / "lock").exists(), "a stale torch lock would block the build forever"
        library = Path(build_directory) / f"{name}.so"
        if not library.exists():
            self.calls += 1
            library.write_bytes(self.content)


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    fake = FakeLoad()
    monkeypatch.setattr(cpp_extension, "load", fake)
    monkeypatch.setenv("FUSED_CACHE_DIR", str(tmp_path / "cache"))
    key = _cpp.cache_key(_cpp.CPU_SOURCES + _cpp.CPU_HEADERS)
    build_dir = tmp_path / "cache" / key
    library = build_dir / f"fused_cpp_{key.rsplit('-', 1)[-1]}.so"
    return fake, build_dir, library


def build():
    _cpp._build("fused_cpp", _cpp.CPU_SOURCES, _cpp.CPU_HEADERS)


def test_cache_folders_are_private_and_a_built_library_is_recorded(fake_build):
    fake, build_dir, library = fake_build
    build()
    assert fake.calls == 1 and library.is_file()
    assert oct(build_dir.stat().st_mode & 0o077) == "0o0"
    build()  # recorded and unchanged: loaded as it is
    assert fake.calls == 1


def test_truncated_or_planted_library_is_rebuilt_not_loaded(fake_build, capsys):
    fake, build_dir, library = fake_build
    build()
    library.write_bytes(library.read_bytes()[:5])  # truncated (a build killed while linking, a full disk)
    build()
    assert fake.calls == 2 and "rebuilding" in capsys.readouterr().err
    (build_dir / _cpp.MANIFEST).unlink()  # a library nobody recorded building: planted
    library.write_bytes(b"\x7fELF planted")
    build()
    assert fake.calls == 3 and library.read_bytes() == fake.content


def test_cache_writable_by_others_is_refused(fake_build):
    fake, build_dir, library = fake_build
    build()
    build_dir.chmod(0o777)
    with pytest.raises(_cpp.BuildError, match="others can write to it"):
        build()
    build_dir.chmod(0o700)
    library.chmod(0o666)
    with pytest.raises(_cpp.BuildError, match="others can write to it"):
        build()


def test_cache_of_another_user_is_refused(fake_build, monkeypatch):
    fake, build_dir, library = fake_build
    build()
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)
    with pytest.raises(_cpp.BuildError, match="belongs to uid .* not to you"):
        build()
    # and the public API reports it as a reason, not a traceback
    monkeypatch.setattr(_cpp, "load_cpu", lambda: _cpp._build("fused_cpp", _cpp.CPU_SOURCES, _cpp.CPU_HEADERS))
    uncached = dataclasses.replace(_dispatch.REGISTRY["cpp"], load=_cpp.cpu_backend.__wrapped__)
    monkeypatch.setitem(_dispatch.REGISTRY, "cpp", uncached)
    ok, why = _dispatch.backend_status.__wrapped__("cpp")
    assert not ok and "FUSED_CACHE_DIR" in why


def test_killed_build_leaves_no_lock_that_blocks(fake_build):
    fake, build_dir, library = fake_build
    build_dir.mkdir(parents=True, mode=0o700)
    (build_dir / "lock").write_text("")  # torch's baton of a build killed mid-way
    # a builder holding our lock is killed: the kernel releases the lock, the next process proceeds
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, time
        f = open({str(build_dir / 'build.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)
        print('locked', flush=True); time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    threading.Timer(1.0, lambda: os.kill(holder.pid, signal.SIGKILL)).start()
    build()  # waits for the holder, then finds and removes the stale baton
    holder.wait()
    assert fake.calls == 1 and not (build_dir / "lock").exists()


def test_build_cache_key_tracks_the_flags_passed_to_the_compiler(monkeypatch, tmp_path):
    # The CUDA build's flags define the Otsu bin limits: a library built with other limits
    # must not be loaded, so each flag set builds into its own folder.
    from torch.utils import cpp_extension

    folders = []
    monkeypatch.setattr(cpp_extension, "load", lambda build_directory, **kwargs: folders.append(build_directory))
    monkeypatch.setenv("FUSED_CACHE_DIR", str(tmp_path))
    other_limit = [f for f in _cpp.CUDA_CFLAGS if not f.startswith("-DFUSED_MAX_VICO_BINS")]
    for cuda_flags in (_cpp.CUDA_CFLAGS, other_limit + ["-DFUSED_MAX_VICO_BINS=32"], _cpp.CUDA_CFLAGS):
        _cpp._build("fused_cuda", _cpp.CUDA_SOURCES, ("otsu_rule.h",), extra_cuda_cflags=cuda_flags)
    assert folders[0] != folders[1] and folders[0] == folders[2]
