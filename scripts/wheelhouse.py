"""Wheels for a GPU node that has a CUDA PyTorch but no package index (an NGC or site container, a
firewalled cluster): recipebox's dependencies that the node lacks, for the node's Python, built here.

Run it where pip reaches an index, with the project's .venv (its installed versions are the ones fetched):
    python3 -m pip list --format=freeze > node.txt                       # on the node
    .venv/bin/python scripts/wheelhouse.py --have node.txt --dest wheels  # here
    site=$(mktemp -d) && python3 -m pip install --no-index --no-deps --target "$site" wheels/*.whl
    PYTHONPATH=$site:$PWD RECIPEBOX_PYTHON=python3 bash bench/gpu.sh  # on the node (a folder of your own)
recipebox's own wheel (launch/, kernels/, data/ and checkpoints/ as recipebox.*) is built from this checkout
with the rest: after changing those folders, run it again.
The closure walks recipebox's requirements (with --extras) through the installed metadata, stopping at what
the node has (--have: `pip freeze` lines, or bare names), at torch and its CUDA libraries, and at --without.
A version on the node that a requirement rejects is printed as a warning, torch's pin too (recipebox's own
checks also pass with torch 2.11 and transformers 5.17, as a container holds them).
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata as metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

NEVER = {"torch", "triton", "recipebox"}  # the node's own PyTorch stack, and the repository (built apart)
REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXTRAS = "deepspeed,gpu"  # what scripts/gpu_check.sh runs: DeepSpeed's rows, the Trainer's, pytest
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
    """{name: installed version} to fetch, and the node's versions that a requirement rejects. A package
    met again with new extras has those extras' requirements walked too, the node's own packages included."""
    env = {
        **default_environment(),
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
    }
    wanted: dict[str, str] = {}
    walked: dict[str, set[str]] = {}  # per package (fetched or the node's): the extras read so far
    clashes: dict[str, None] = {}
    todo = [(Requirement(r), set(extras)) for r in metadata.requires("recipebox") or []]
    while todo:
        req, active = todo.pop()
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in active | {""}):
            continue
        name = canonicalize_name(req.name)
        if have.get(name) and not _satisfies(req, have[name]):
            clashes[f"{req.name} {have[name]}, outside {req}"] = None
        if name in NEVER or name in without or name.startswith("nvidia-"):
            continue
        if name not in have and name not in wanted:
            try:
                wanted[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                sys.exit(
                    f"error: {name} (needed by recipebox) is not installed here; run 'bash scripts/env.sh'"
                )
            todo += [(Requirement(r), set(req.extras)) for r in metadata.requires(name) or []]
            walked[name] = set(req.extras)
            continue
        new = set(req.extras) - walked.setdefault(name, set())
        if new:  # the node's package, or one met before, asked for with more extras: just their requirements
            walked[name] |= new
            reqs = [Requirement(r) for r in _installed_requires(name)]
            todo += [(r, new) for r in reqs if r.marker and "extra" in str(r.marker)]
    return wanted, list(clashes)


def _satisfies(req: Requirement, version: str) -> bool:
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:  # a distribution's own scheme (e.g. 1.1build1): nothing to compare
        return True


def _installed_requires(name: str) -> list[str]:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []


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
    for wheel in dest.glob("*.whl"):
        wheel_name, wheel_version, _, tags = parse_wheel_filename(wheel.name)
        compiled = any(t.abi != "none" or t.platform != "any" for t in tags)  # for this machine's Python
        if wheel_name == name and str(wheel_version) == version and compiled:
            wheel.unlink()
            sys.exit(
                f"error: {spec} has no binary wheel for Python {python_version} on {PLATFORMS[0]}, and the "
                f"one built here ({wheel.name}) is for this machine; build it on the node's Python instead"
            )
    return "built here"


def package_folders() -> list[str]:
    """The checkout's folders that install as recipebox.* (setup.cfg's package_dir: `recipebox.x = folder`)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return [line.split("=")[1].strip() for line in cfg["options"]["package_dir"].splitlines() if "=" in line]


def build_own_wheel(dest: Path) -> Path:
    """recipebox's wheel, built from a copy of this checkout's package files into dest (replacing an earlier
    build of it). The copy keeps a build/ folder left in the checkout by another layout out of the wheel."""
    for old in dest.glob("recipebox-*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "wheel", "--no-deps"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("setup.cfg", "pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, tmp)
        for folder in package_folders():
            shutil.copytree(REPO / folder, Path(tmp, folder), ignore=shutil.ignore_patterns("__pycache__"))
        built = subprocess.run([*pip, "-w", str(dest.resolve()), tmp], capture_output=True, text=True)
    if built.returncode:
        sys.exit(f"error: recipebox's own wheel did not build from {REPO}\n{built.stderr}")
    return next(dest.glob("recipebox-*.whl"))


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
        "--extras",
        default=DEFAULT_EXTRAS,
        help=f"recipebox extras, comma-separated (default {DEFAULT_EXTRAS}: what scripts/gpu_check.sh runs)",
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
    wanted["recipebox"] = parse_wheel_filename(build_own_wheel(args.dest).name)[1].public
    print(f"recipebox=={wanted['recipebox']}: built here from {REPO}", flush=True)
    for clash in clashes:
        print(f"warning: the node has {clash}", file=sys.stderr)
    ours, stale = [], []
    for wheel in sorted(args.dest.glob("*.whl")):
        wheel_name, wheel_version, _, _ = parse_wheel_filename(wheel.name)
        (ours if wanted.get(wheel_name) == str(wheel_version) else stale).append(wheel)
    for wheel in stale:  # '*.whl' on the node would install it too, beside or over the wanted version
        print(
            f"warning: {wheel} is not one of these wheels; remove it before installing {args.dest}/*.whl",
            file=sys.stderr,
        )
    size = sum(f.stat().st_size for f in ours) / 2**20
    print(f"{len(ours)} wheels in {args.dest} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
