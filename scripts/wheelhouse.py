"""Wheels for a GPU node that has a CUDA PyTorch but no package index (an NGC or site container, a
firewalled cluster): recipebox's dependencies that the node lacks, for the node's Python, built here.

Run it where pip reaches an index, with the project's .venv (its installed versions are the ones fetched):
    python3 -m pip list --format=freeze > node.txt                       # on the node
    .venv/bin/python scripts/wheelhouse.py --have node.txt --dest wheels  # here
    python3 -m pip install --no-index --no-deps --target /tmp/site wheels/*.whl  # on the node, then
    PYTHONPATH=/tmp/site:$PWD RECIPEBOX_PYTHON=python3 bash bench/gpu.sh
The closure walks recipebox's requirements (with --extras) through the installed metadata, stopping at what
the node has (--have: `pip freeze` lines, or bare names), at torch and its CUDA libraries, and at --without.
A requirement the node has at a version the fetched wheels reject is printed as a warning.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

NEVER = {"torch", "triton", "recipebox"}  # the node's own PyTorch stack, and the repository itself
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
]
PLATFORMS += ["manylinux1_x86_64", "linux_x86_64"]


def read_have(path: Path) -> dict[str, str | None]:
    """`name==version` or bare `name` per line (pip freeze, pip list --format=freeze); '#' comments."""
    have: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-e "):
            continue
        name, _, version = line.partition("==")
        have[canonicalize_name(name.split(" @ ")[0])] = version.strip() or None
    return have


def closure(
    extras: list[str], have: dict, without: set[str], python_version: str
) -> tuple[dict[str, str], list[str]]:
    """{name: installed version} to fetch, and the (requirement, node version) pairs the node fails."""
    env = {
        **default_environment(),
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
    }
    wanted: dict[str, str] = {}
    clashes: list[str] = []
    todo = [(Requirement(r), set(extras)) for r in metadata.requires("recipebox") or []]
    while todo:
        req, active = todo.pop()
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in active | {""}):
            continue
        name = canonicalize_name(req.name)
        if name in NEVER or name in without or name.startswith("nvidia-") or name in wanted:
            continue
        if name in have:
            node = have[name]
            if node and not req.specifier.contains(Version(node), prereleases=True):
                clashes.append(f"{req.name} {node}, outside {req}")
            continue
        try:
            wanted[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            sys.exit(
                f"error: {name} (needed by recipebox) is not installed here; run 'bash scripts/env.sh' first"
            )
        todo += [(Requirement(r), set(req.extras)) for r in metadata.requires(name) or []]
    return wanted, clashes


def fetch(name: str, version: str, dest: Path, python_version: str) -> str:
    """A binary wheel for the node's platform and Python if the index has one; else a wheel built here from
    the source release (pure-Python packages: DeepSpeed without its prebuilt ops, seqeval, rouge-score)."""
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    target = ["--python-version", python_version, "--implementation", "cp"]
    target += [arg for p in PLATFORMS for arg in ("--platform", p)]
    spec = f"{name}=={version}"
    binary = [*pip, "download", "--no-deps", "--only-binary=:all:", *target, "-d", str(dest), spec]
    if subprocess.run(binary, capture_output=True).returncode == 0:
        return "downloaded"
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(dest), spec], capture_output=True, text=True
    )
    if built.returncode:
        sys.exit(
            f"error: no wheel for {spec}: neither a binary for Python {python_version} nor a build here\n{built.stderr}"
        )
    return "built here"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--have", type=Path, help="the node's installed packages (pip list --format=freeze)")
    parser.add_argument(
        "--dest", type=Path, default=Path("wheels"), help="folder for the wheels (default wheels)"
    )
    parser.add_argument(
        "--python-version", default="3.12", help="the node's Python, major.minor (default 3.12)"
    )
    parser.add_argument(
        "--extras", default="deepspeed", help="recipebox extras, comma-separated (default deepspeed)"
    )
    parser.add_argument("--without", action="append", default=[], help="a package to leave out (repeatable)")
    args = parser.parse_args()
    if args.have and not args.have.is_file():
        parser.error(
            f"--have {args.have}: no such file; make it on the node with 'python3 -m pip list --format=freeze'"
        )
    have = read_have(args.have) if args.have else {}
    without = {canonicalize_name(n) for n in args.without}
    extras = [e for e in args.extras.split(",") if e]
    wanted, clashes = closure(extras, have, without, args.python_version)
    args.dest.mkdir(parents=True, exist_ok=True)
    for name, version in sorted(wanted.items()):
        print(f"{name}=={version}: {fetch(name, version, args.dest, args.python_version)}", flush=True)
    for clash in clashes:
        print(f"warning: the node has {clash}", file=sys.stderr)
    size = sum(f.stat().st_size for f in args.dest.glob("*.whl")) / 2**20
    print(f"{len(wanted)} wheels in {args.dest} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
