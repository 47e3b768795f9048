"""JIT build of the C++ kernels: cache key and the error when no compiler exists."""

import pytest
import torch

from fused import _cpp


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
