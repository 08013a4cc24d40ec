"""The model card: training curves drawn from metrics.jsonl (resumed runs, torn lines, nothing to plot),
embedded in an export's README.md, and the demo examples written beside it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from recipebox.checkpoints.curves import COUNTERS, DPI, PANEL_INCHES, panels, plot_curves, read_curves
from recipebox.checkpoints.export import export_hf

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_LINE = "![Training curves](curves.png)"


def write_metrics(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


def train(step: int, loss: float) -> dict:
    return {"step": step, "time": 1.0 + step, "train/loss": loss, "train/lr": 1e-3 / step, "train/epoch": 0.1}


RUN = [
    train(1, 2.0),
    train(2, 1.7),
    {"step": 2, "time": 3.5, "eval/loss": 1.8, "eval/accuracy": 0.4, "eval/examples": 200.0},
    {"step": 2, "time": 3.6, "eval/f1/LOC": 0.3, "eval/loss/mlm": 1.2, "replica_param_sums": [1.0, 1.0]},
    train(3, 1.5),
    train(3, 1.4),  # the run resumed from step 2 and logged step 3 again
    train(4, 1.2),
    {"step": 4, "time": 5.5, "eval/loss": 1.3, "eval/accuracy": 0.6, "eval/examples": 200.0},
    {"step": 4, "time": 5.6, "test/loss": 1.35, "test/accuracy": 0.55, "test/examples": 300.0},
]
TORN = '{"step": 5, "time": 6.0, "train/lo'  # a crash mid-write


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, RUN, TORN)
    return path


def test_the_later_line_of_a_step_wins_and_torn_lines_are_skipped(metrics_file):
    curves = read_curves(metrics_file)
    assert curves["train/loss"] == {1: 2.0, 2: 1.7, 3: 1.4, 4: 1.2}
    assert curves["eval/accuracy"] == {2: 0.4, 4: 0.6}
    assert "replica_param_sums" not in curves and "time" not in curves and "step" not in curves


def test_panels_are_training_loss_lr_then_headline_metrics_with_test_beside_eval(metrics_file):
    chosen = panels(read_curves(metrics_file))
    titles = [title for title, _ in chosen]
    assert titles == ["train loss", "learning rate", "eval & test loss", "eval & test accuracy"]
    assert chosen[3][1] == {"eval": {2: 0.4, 4: 0.6}, "test": {4: 0.55}}
    assert "examples" in COUNTERS  # eval/examples is a count, not a score, so it has no panel


def test_question_answering_panels_skip_counts_and_put_subsets_last(tmp_path):
    """QA logs exact and f1, then the same for answerable (HasAns_) and unanswerable (NoAns_) questions, with
    their counts (total, HasAns_total): the counts get no panel, and best_f1 is not crowded out by subsets."""
    names = ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
             "NoAns_total", "best_f1", "best_f1_threshold"]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [train(1, 1.0), {"step": 1, "eval/loss": 0.5, **{f"eval/{n}": 60.0 for n in names}}])
    titles = [title for title, _ in panels(read_curves(path))]
    assert titles == ["train loss", "learning rate", "eval loss", "eval exact", "eval f1", "eval best_f1",
                      "eval best_f1_threshold", "eval HasAns_exact"]  # fmt: skip


def test_panels_are_at_most_eight(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [train(1, 1.0), {"step": 1, **{f"eval/m{i}": i / 10 for i in range(10)}}])
    assert len(panels(read_curves(path))) == 8


def test_plot_curves_draws_a_small_png_of_the_grid(metrics_file, tmp_path):
    out = tmp_path / "curves.png"
    assert plot_curves(metrics_file, out)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) < 200_000
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        # 4 panels: one row of 4 at PANEL_INCHES each
        want = (4 * PANEL_INCHES[0] * DPI, PANEL_INCHES[1] * DPI)
        assert image.size == pytest.approx(want, abs=2)
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert len(colours) > 10  # lines, markers and text on white, not a blank canvas
    blue = [n for n, rgb in colours if rgb[2] > 150 and rgb[0] < 80]  # the "C0" curves
    red = [n for n, rgb in colours if rgb[0] > 180 and rgb[1] < 80 and rgb[2] < 80]  # the test points
    assert sum(blue) > 50 and sum(red) > 10


def test_five_panels_fill_a_grid_of_three_columns(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [train(1, 1.0), train(2, 0.9), {"step": 2, "eval/a": 1, "eval/b": 2, "eval/c": 3}])
    assert plot_curves(path, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == pytest.approx((3 * PANEL_INCHES[0] * DPI, 2 * PANEL_INCHES[1] * DPI), abs=2)


@pytest.mark.parametrize(
    "content",
    [
        None,  # no file at all
        "",
        "\n\n",
        TORN,
        '{"step": 1, "time": 2.0, "train/epoch": 0.5, "eval/examples": 10, "eval/f1/LOC": 0.5}\n',
        '[1, 2]\n"text"\n{"time": 1.0, "train/loss": 1.0}\n{"step": 1, "train/loss": NaN, "train/lr": "x"}\n',
    ],
)
def test_nothing_to_plot_returns_false_and_writes_nothing(tmp_path, content):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    out = tmp_path / "curves.png"
    assert plot_curves(path, out) is False
    assert not out.exists()


def tiny_bert():
    import transformers

    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    return transformers.BertForSequenceClassification(config)


def test_export_embeds_the_curves_and_writes_the_examples(metrics_file, tmp_path):
    examples = {"predict": [["a fine day"], ["a dreadful day"]]}
    out = export_hf(
        tiny_bert(),
        None,
        tmp_path / "export",
        title="Tiny",
        metrics={"eval/accuracy": 0.6},
        config={"lr": 1e-3},
        metrics_file=metrics_file,
        examples=examples,
    )
    assert out == tmp_path / "export" and not (tmp_path / "export.tmp").exists()
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Training curves" in card and IMAGE_LINE in card
    assert card.index("## Evaluation") < card.index(IMAGE_LINE) < card.index("## Training configuration")
    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((out / "examples.json").read_text(encoding="utf-8")) == examples
    assert (out / "model.safetensors").is_file()


def test_export_without_curves_says_nothing_of_them(tmp_path):
    out = export_hf(tiny_bert(), None, tmp_path / "export", title="Tiny", metrics={}, config={})
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "curves" not in card.lower()
    assert not (out / "curves.png").exists() and not (out / "examples.json").exists()
    # a metrics file with nothing to plot: the same card
    empty = tmp_path / "metrics.jsonl"
    empty.write_text(TORN, encoding="utf-8")
    out = export_hf(tiny_bert(), None, out, title="Tiny", metrics={}, config={}, metrics_file=empty)
    assert "curves" not in (out / "README.md").read_text(encoding="utf-8").lower()
    assert not (out / "curves.png").exists()


def test_an_export_replaces_only_an_earlier_export(tmp_path):
    """RUN/export is replaced as a whole by the next export; a folder that is not an export (a run, a
    checkpoint, the user's files), named by mistake as `python -m recipebox.checkpoints export CKPT OUT`'s OUT, is
    refused before anything is read or written, and keeps every file."""
    from recipebox.checkpoints.__main__ import export_checkpoint
    from recipebox.checkpoints.sharded import CheckpointError

    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "notes.txt").write_text("mine", encoding="utf-8")
    for write in (
        lambda: export_hf(tiny_bert(), None, run, title="Tiny", metrics={}, config={}),
        lambda: export_checkpoint(tmp_path / "no-such-checkpoint", run),
    ):
        with pytest.raises(CheckpointError, match=f"{run} exists and is not an export.*new or empty folder"):
            write()
    assert (run / "notes.txt").read_text(encoding="utf-8") == "mine" and (run / "checkpoints").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .tmp or .old left beside it

    empty = tmp_path / "empty"
    empty.mkdir()
    first = export_hf(tiny_bert(), None, empty, title="First", metrics={}, config={})
    again = export_hf(tiny_bert(), None, first, title="Second", metrics={}, config={})
    assert (again / "README.md").read_text(encoding="utf-8").startswith("# Second")


def test_an_export_leaves_every_folder_beside_it_alone(tmp_path, monkeypatch):
    """Folders named like OUT's working names (OUT.tmp, OUT.old) are the user's: an export, a replacement
    and a failed export leave them and leave nothing of their own. OUT that cannot be a folder (the current
    one, or under a file) is refused before anything is written."""
    from recipebox.checkpoints.sharded import CheckpointError

    out = tmp_path / "mine"
    for name in ("mine.tmp", "mine.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("precious", encoding="utf-8")
    export_hf(tiny_bert(), None, out, title="First", metrics={}, config={})
    export_hf(tiny_bert(), None, out, title="Second", metrics={}, config={})
    model = tiny_bert()
    monkeypatch.setattr(
        model, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, None, out, title="Third", metrics={}, config={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "mine.old", "mine.tmp"]
    assert (out / "README.md").read_text(encoding="utf-8").startswith("# Second")
    for name in ("mine.tmp", "mine.old"):
        assert (tmp_path / name / "notes.txt").read_text(encoding="utf-8") == "precious"

    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(
        CheckpointError, match=f"{tmp_path / 'file'} is not a folder, so .* cannot be written"
    ):
        export_hf(tiny_bert(), None, tmp_path / "file" / "out", title="T", metrics={}, config={})
    monkeypatch.chdir(out)
    with pytest.raises(CheckpointError, match="is the current folder \\(or holds it\\)"):
        export_hf(tiny_bert(), None, ".", title="T", metrics={}, config={})


def test_every_recipes_load_refuses_what_is_not_its_export(tmp_path):
    """transformers loads another task's export with a new, random head (a load report is all it says):
    each recipe's `load`, behind predict and the demos, names the folder and what it holds instead."""
    import importlib

    import transformers

    from recipebox.checkpoints.sharded import CheckpointError

    classifier = export_hf(tiny_bert(), None, tmp_path / "run" / "export", title="T", metrics={}, config={})
    (tmp_path / "empty").mkdir()
    tagger_model = transformers.BertForTokenClassification(tiny_bert().config)
    tagger = export_hf(tagger_model, None, tmp_path / "tagger", title="T", metrics={}, config={})
    for name in ("asr_ctc", "causal_lm", "mlm_nsp", "ner", "qa", "summarization", "text_classification"):
        load = importlib.import_module(f"recipes.{name}").load
        with pytest.raises(
            CheckpointError, match=r"empty is not an export \(no config.json\); pass RUN/export"
        ):
            load(str(tmp_path / "empty"))
        with pytest.raises(CheckpointError, match=rf"run is not an export.*{classifier} is the run's export"):
            load(str(tmp_path / "run"))
        other = tagger if name == "text_classification" else classifier
        with pytest.raises(CheckpointError, match=r"holds a Bert\w+; pass RUN/export of a run that trained"):
            load(str(other))
    import torch
    from safetensors.torch import save_file

    from recipebox.checkpoints.export import check_export

    with pytest.raises(CheckpointError, match=r"export holds no tokenizer or feature extractor"):
        check_export(classifier, "text_classification")  # exported with no processor: incomplete
    (classifier / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    assert check_export(classifier, "text_classification") == str(classifier)  # its own recipe takes it
    for arch, task in (("MarianMTModel", "summarization"), ("XLNetForQuestionAnsweringSimple", "qa")):
        (tmp_path / arch).mkdir()
        (tmp_path / arch / "config.json").write_text(json.dumps({"architectures": [arch]}), encoding="utf-8")
        (tmp_path / arch / "pytorch_model.bin").write_bytes(b"a pickle")
        with pytest.raises(
            CheckpointError, match=rf"{arch} has a config.json but no safetensors weights, the"
        ):
            check_export(tmp_path / arch, task)  # a hub folder with pickled weights only: never unpickled
        (tmp_path / arch / "model.safetensors").write_bytes(b"")
        with pytest.raises(CheckpointError, match=r"model.safetensors does not load .* truncated or damaged"):
            check_export(tmp_path / arch, task)
        save_file({"w": torch.zeros(2)}, tmp_path / arch / "model.safetensors")
        (tmp_path / arch / "tokenizer.json").write_text("{}", encoding="utf-8")
        assert check_export(tmp_path / arch, task) == str(tmp_path / arch)


def test_saved_examples_that_are_not_rows_of_texts_are_named(tmp_path):
    """`predict` without input runs on an export's examples.json: a row that is a bare string would have run
    on its first letter; anything but rows of inputs (a text first) is named with the fix instead."""
    from recipebox.checkpoints.export import saved_examples, saved_inputs
    from recipebox.checkpoints.sharded import CheckpointError

    path = tmp_path / "examples.json"
    path.write_text('{"transcribe": [["examples/a.wav"], ["examples/b.wav"]]}', encoding="utf-8")
    assert saved_inputs(tmp_path, "transcribe", "give audio files") == ["examples/a.wav", "examples/b.wav"]
    path.write_text('{"generate": [["Then,", 24]]}', encoding="utf-8")  # a prompt, then a token count
    assert saved_inputs(tmp_path, "generate", "give a prompt") == ["Then,"]
    for text in ('{"transcribe": ["examples/a.wav"]}', '{"transcribe": [[1]]}', '{"transcribe": [[]]}'):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(CheckpointError, match="examples are not rows of inputs; give audio files"):
            saved_examples(tmp_path, "transcribe", "give audio files")
