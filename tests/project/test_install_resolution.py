"""The README's two install commands resolve on a machine whose pip sees PyPI alone.

There, ``pip install torch==2.13.0`` is the CUDA build, which requires its own
triton; the constraints file must agree with it. pip's resolver runs on the
README's own ``pip install`` lines (``--dry-run --report``: metadata only, no
multi-GB download) with this machine's pip configuration switched off. Skipped,
with the reason, only when no package index answers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INDEX = "https://pypi.org/simple/"


def readme_commands() -> dict[str, str]:
    """The bash command under "**Main job**" and under "**Tests**" in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = {}
    for label in ("Main job", "Tests"):
        match = re.search(rf"\*\*{label}\*\*.*?```bash\n(.*?)\n```", text, re.S)
        assert match, f"README has no bash block after **{label}**"
        out[label] = match.group(1).strip()
    return out


def pip_install_args(command: str) -> list[list[str]]:
    """The arguments of each ``pip install`` in a ``&&`` chain, without -q and the pip self-upgrade."""
    installs = []
    for part in command.split("&&"):
        words = shlex.split(part)
        if words[:2] != ["pip", "install"]:
            continue
        args = [w for w in words[2:] if w not in ("-q", "--quiet")]
        if args == ["--upgrade", "pip"]:
            continue
        installs.append(args)
    return installs


def pypi_only_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def index_answers() -> str | None:
    try:
        urllib.request.urlopen(INDEX + "pip/", timeout=15).read(64)
    except OSError as exc:
        return f"{INDEX} does not answer ({exc})"
    return None


def test_readme_commands_parse():
    commands = readme_commands()
    for label, command in commands.items():
        installs = pip_install_args(command)
        assert installs[0] == ["torch==2.13.0"], (label, installs)
        assert any("-e" in args for args in installs), (label, installs)
    assert commands["Tests"] in (ROOT / ".ci" / "run").read_text(), ".ci/run must run the README's test command"
    # the peer oracle of tests/processors/test_trace_vs_peer_tool.py, pinned, without its declared dependencies (torchvision...)
    assert ["--no-deps", "attention-map-diffusers==1.0.0"] in pip_install_args(commands["Tests"])


@pytest.mark.parametrize("label", ["Main job", "Tests"])
def test_readme_install_resolves_on_pypi_alone(label, tmp_path):
    reason = index_answers()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    # One resolution for the whole chain: torch is pinned by the first line, so the later lines see it.
    # A --no-deps line (the peer oracle) would switch dependency resolution off for all of it: those
    # lines are resolved on their own, as pip runs them.
    installs = pip_install_args(readme_commands()[label])
    no_deps = [args for args in installs if "--no-deps" in args]
    args = [a for install in installs if install not in no_deps for a in install]

    def dry_run(args, report):
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", str(report),
             "--index-url", INDEX, *args],
            cwd=ROOT, env=pypi_only_env(), capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, f"pip cannot resolve the README's {label} install {args} on PyPI alone:\n" + \
            (proc.stderr[-3000:] or proc.stdout[-3000:])
        return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}

    for i, extra in enumerate(no_deps):
        got = dry_run(extra, tmp_path / f"no-deps-{i}.json")
        wanted = dict(a.split("==") for a in extra if "==" in a)
        assert got == {name.lower(): version for name, version in wanted.items()}, (extra, got)
    report = tmp_path / "report.json"
    resolved = dry_run(args, report)
    assert resolved["torch"] == "2.13.0"  # PyPI's build, not a local +cpu wheel
    assert "triton" in resolved
    pins = {}
    for line in (ROOT / "constraints-ci.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    for name, version in pins.items():
        if name in resolved:
            assert resolved[name] == version, (name, resolved[name], version)
