"""The demo apps, as a user meets them: `python demos/app.py EXPORT` in its own process, driven in a real
headless Chromium. Every page check compares what the page shows with what the recipe's own inference
function returns for the same export and input, so a wrong answer on the page fails the test.

The exports are made here by the recipes themselves (a few steps each, one process), so they carry what a
real export carries: examples.json from held-out data, curves.png in the model card, fitted thresholds.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env
from demo_pages import grid, start_app, stop_apps, wait_for_server, wait_for_text
from recipe_runs import RECIPE, TINY, python, run

APP = str(REPO / "demos" / "app.py")
NER_TEXT = "Anna Berg flew from Oslo to meet Contoso staff in Paris ."


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_dir):
    """{app: export folder}: MLM+NSP (tiny BERT), multi-label toxic comments (MiniLM, fitted thresholds),
    NER (MiniLM, enough steps to tag the toy entities), trained side by side."""
    root = tmp_path_factory.mktemp("demo_runs")
    common = ["--tracker", "none", "--log-every", "1"]
    commands = {
        "mlm_nsp": [RECIPE, "--tokenizer", str(tokenizer_dir), *TINY, "--max-steps", "20", "--eval-every", "10"],
        "text_classification": [str(REPO / "recipes" / "text_classification.py"), "--config",
                                str(REPO / "recipes" / "configs" / "toxic.yaml"), "--max-steps", "3"],
        "ner": [str(REPO / "recipes" / "ner.py"), "--max-steps", "40", "--eval-every", "20"],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [sys.executable, *cmd, *common, "--output-dir", str(root / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
            cwd=REPO,
        )  # fmt: skip
        for name, cmd in commands.items()
    }
    for name, proc in procs.items():
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"
    return {name: root / name / "export" for name in commands}


@pytest.fixture(scope="module")
def servers(exports):
    """{app: URL}: `python demos/app.py EXPORT --port P` for each export, started together; stopped after."""
    started = {}
    try:
        for name, export in exports.items():
            started[name] = start_app(export)
        for proc, url, _ in started.values():
            wait_for_server(proc, url)
        yield {name: url for name, (_, url, _) in started.items()} | {
            f"{name}_port": port for name, (_, _, port) in started.items()
        }
    finally:
        stop_apps([proc for proc, _, _ in started.values()])


def test_exports_carry_examples_and_curves(exports):
    for name, export in exports.items():
        examples = json.loads((export / "examples.json").read_text())
        assert examples and all(rows for rows in examples.values()), name
        assert (export / "curves.png").stat().st_size > 1000, name
        assert "![Training curves](curves.png)" in (export / "README.md").read_text(), name


def test_fill_mask_page_shows_the_pipelines_top_k(servers, exports, page):
    from playwright.sync_api import expect

    from recipes.mlm_nsp import fill_mask

    example = json.loads((exports["mlm_nsp"] / "examples.json").read_text())["fill_mask"][0][0]
    page.goto(servers["mlm_nsp"])
    page.get_by_text(example[:40]).first.click()  # the held-out example fills the text box
    expect(page.locator("#fill-text textarea")).to_have_value(example)
    page.get_by_role("button", name="Fill", exact=True).click()
    page.locator("#fill-out").get_by_role("gridcell").nth(9).wait_for(timeout=60_000)
    shown = grid(page, "fill-out", 2)
    expected = fill_mask(str(exports["mlm_nsp"]), example, 5)
    assert [(t, float(p)) for t, p in shown] == [(t, round(p, 4)) for t, p in expected]


def test_next_sentence_page_shows_the_nsp_probability(servers, exports, page):
    from recipes.mlm_nsp import next_sentence

    a, b = json.loads((exports["mlm_nsp"] / "examples.json").read_text())["next_sentence"][-1]
    page.goto(servers["mlm_nsp"])
    page.get_by_role("tab", name="Next sentence?").click()
    page.locator("#nsp-a textarea").fill(a)
    page.locator("#nsp-b textarea").fill(b)
    page.get_by_role("button", name="Check", exact=True).click()
    shown = wait_for_text(page, "nsp-verdict", "p(B follows A)")
    p = next_sentence(str(exports["mlm_nsp"]), a, b)
    assert f"p(B follows A) = {p:.4f}" in shown
    assert ("B is the next sentence" if p >= 0.5 else "B is not the next sentence") in shown


def test_classification_page_applies_the_fitted_thresholds(servers, exports, page):
    from transformers import AutoConfig

    from recipes.text_classification import predict

    text = "You brainless clown, thanks for nothing."
    page.goto(servers["text_classification"])
    page.locator("#cls-text textarea").fill(text)
    page.get_by_role("button", name="Classify", exact=True).click()
    wait_for_text(page, "cls-decision", "Labels:")
    (result,) = predict(str(exports["text_classification"]), [text])
    fitted = AutoConfig.from_pretrained(exports["text_classification"]).label_thresholds
    rows = [r.locator("td").all_inner_texts() for r in page.locator("#cls-decision table tbody tr").all()]
    applies = {n: p >= fitted[n] for n, p in result["scores"].items()}  # the fitted thresholds, not 0.5
    assert result["labels"] == [n for n, yes in applies.items() if yes]
    assert rows == [
        [n, f"{p:.4f}", f"{fitted[n]:.2f}", "yes" if applies[n] else "no"]
        for n, p in result["scores"].items()
    ]
    chosen = ", ".join(result["labels"]) or "none"
    assert f"Labels: {chosen}" in page.locator("#cls-decision").inner_text()
    # The label output: every label with its score in percent, highest first, and no single headline.
    shown = page.locator("#cls-scores").inner_text().split("\n")[1:]
    ranked = sorted(result["scores"].items(), key=lambda kv: -kv[1])
    assert shown == [x for name, p in ranked for x in (name, f"{round(p * 100)}%")]


def test_ner_page_highlights_the_recipes_entities(servers, exports, page):
    from demos.ner import spans
    from recipes.ner import predict

    expected = predict(str(exports["ner"]), NER_TEXT)
    assert any(tag != "O" for _, tag in expected), "the NER export found no entity: train it longer"
    page.goto(servers["ner"])
    page.locator("#ner-text textarea").fill(NER_TEXT)
    page.get_by_role("button", name="Tag", exact=True).click()
    page.locator("#ner-table").get_by_role("gridcell").nth(2 * len(expected) - 1).wait_for(timeout=60_000)
    assert grid(page, "ner-table", 2) == [list(pair) for pair in expected]
    # Each entity is one highlighted piece followed by its type; words outside entities stay unlabelled.
    pieces = page.locator("#ner-entities .token")
    shown = [(pieces.nth(i).locator(".text").inner_text().strip(), pieces.nth(i).locator(".label").all_inner_texts())
             for i in range(pieces.count())]  # fmt: skip
    assert shown == [(text.strip(), [kind] if kind else []) for text, kind in spans(expected)]


def test_api_answers_by_name_and_long_input_is_windowed(servers, exports):
    from gradio_client import Client

    from recipes.ner import load, predict

    client = Client(servers["ner"], verbose=False)
    long_text = " ".join([NER_TEXT] * 40)
    tok = load(str(exports["ner"]))[0]
    assert len(tok(long_text)["input_ids"]) > tok.model_max_length
    highlighted, table, note = client.predict(long_text, api_name="/tag")
    assert [tuple(row) for row in table["data"]] == predict(str(exports["ner"]), long_text)
    assert "windows" in note


def test_eight_concurrent_requests_are_all_answered_correctly(servers, exports):
    from gradio_client import Client

    from recipes.text_classification import predict

    client = Client(servers["text_classification"], verbose=False)
    texts = [
        f"Comment number {i}: {'you idiot' if i % 2 else 'thanks for the fix'}" * (i + 1) for i in range(8)
    ]
    jobs = [client.submit(t, api_name="/classify") for t in texts]
    done, _ = concurrent.futures.wait(jobs, timeout=180)
    assert len(done) == 8
    expected = predict(str(exports["text_classification"]), texts)
    for job, text, want in zip(jobs, texts, expected):
        scores, decision = job.result()
        got = {c["label"]: c["confidence"] for c in scores["confidences"]}
        assert got.keys() == want["scores"].keys(), text
        assert all(abs(got[k] - v) < 1e-5 for k, v in want["scores"].items()), text
        assert f"Labels: **{', '.join(want['labels']) or 'none'}**" in decision, text


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on `port` (Linux /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_apps_listen_on_localhost_only(servers):
    loopback = "0100007F"  # 127.0.0.1, little-endian hex as the kernel writes it
    for name in ("mlm_nsp", "text_classification", "ner"):
        assert listening_addresses(servers[f"{name}_port"]) == {loopback}, name


@pytest.mark.parametrize("target", ["missing", "not_an_export", "config_not_an_object"])
def test_a_folder_without_an_export_stops_with_exit_2(tmp_path, target):
    folder = tmp_path / target
    if target == "not_an_export":
        folder.mkdir()
        (folder / "notes.txt").write_text("no model here")
    elif target == "config_not_an_object":
        folder.mkdir()
        (folder / "config.json").write_text("[]")
        (folder / "model.safetensors").write_bytes(b"")
    proc = python(APP, str(folder), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {folder}") and "Running on" not in proc.stdout
    assert "Traceback" not in proc.stderr


def test_predict_entry_prints_the_saved_examples(exports, capsys):
    proc = run([sys.executable, RECIPE, "predict", str(exports["mlm_nsp"])], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("fill-mask:") == 3 and proc.stdout.count("next sentence? p=") == 6
    # The other recipes' predict entries do the same in this process (the command line is the same main)
    from recipebox.checkpoints.sharded import CheckpointError
    from recipes import ner, text_classification

    saved = json.loads((exports["ner"] / "examples.json").read_text())["tag"]
    assert ner.main(["predict", str(exports["ner"])]) == 0
    blocks = capsys.readouterr().out.strip("\n").split("\n\n")
    assert blocks == [
        "\n".join(f"{w}\t{t}" for w, t in ner.predict(str(exports["ner"]), s)) for (s,) in saved
    ]
    saved = [
        t for (t,) in json.loads((exports["text_classification"] / "examples.json").read_text())["classify"]
    ]
    assert text_classification.main(["predict", str(exports["text_classification"])]) == 0
    labels = text_classification.predict(str(exports["text_classification"]), saved)
    assert capsys.readouterr().out.splitlines() == [f"{t}\t{r}" for t, r in zip(saved, labels)] and saved
    missing = exports["ner"].parent / "no_examples"
    missing.mkdir()
    with pytest.raises(CheckpointError, match=r"no_examples/examples.json does not exist .*; give a text"):
        ner.main(["predict", str(missing)])


def tiny_gpt2_export(folder):
    """A GPT-2 of one layer and a 32-token window, exported with a byte-level BPE trained here (seconds)."""
    import transformers

    from recipebox.checkpoints.export import export_hf
    from recipebox.data.tokenizer import train_byte_bpe

    tok = train_byte_bpe(["The harbour saw ships arrive in spring and leave in autumn."] * 20, vocab_size=300)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    return export_hf(transformers.GPT2LMHeadModel(config), tok, folder, title="T", metrics={}, config={})


def upload(url: str, name: str, data: bytes, opener=None) -> str:
    """POSTs one file to a running app's upload endpoint, as the page does; the path it was stored at."""
    import urllib.request

    boundary = "recipeboxboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n\r\n'
    request = urllib.request.Request(
        f"{url}gradio_api/upload",
        data=head.encode() + data + f"\r\n--{boundary}--\r\n".encode(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with (opener or urllib.request.build_opener()).open(request, timeout=30) as answer:
        (stored,) = json.loads(answer.read())
    return stored


def log_in(url: str, user: str, password: str):
    """An opener holding the app's session cookie after a login through its /login form, or HTTPError 400."""
    import http.cookiejar
    import urllib.parse
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": user, "password": password}).encode()
    opener.open(urllib.request.Request(f"{url}login", data=form), timeout=30).close()
    return opener


def test_a_login_guards_the_app_and_uploads_stay_private_until_cache_minutes_and_the_stop(tmp_path):
    """`python demos/app.py EXPORT --auth-file LOGINS --cache-minutes 0.05`, as on a shared login node where
    every user reaches 127.0.0.1: without a login the page's config, its API and uploads answer 401, a wrong
    password 400; logged in, a file uploaded (as the speech page does with a clip) lands in a 0700 folder of
    the app's own, not /tmp/gradio that every user shares; it is gone once older than 3 s, and the folder
    with everything in it when the app is stopped with SIGTERM (`kill`, a scheduler)."""
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    from demos.app import main

    export = tiny_gpt2_export(tmp_path / "lm")
    logins = tmp_path / "logins"
    logins.write_text(
        "\ufeff# who may use the app (saved with a BOM, as some editors do)\r\nanna : two words \r\n"
    )
    logins.chmod(0o600)
    proc, url, _ = start_app(export, "--auth-file", logins, "--cache-minutes", "0.05")
    try:
        wait_for_server(proc, url)
        for refused in (lambda: urllib.request.urlopen(f"{url}config", timeout=30),
                        lambda: upload(url, "clip.wav", b"RIFF0000WAVE")):  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as answer:
                refused()
            assert answer.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as answer:
            log_in(url, "anna", "two")
        assert answer.value.code == 400
        anna = log_in(url, "anna", "two words")
        first = Path(upload(url, "clip.wav", b"RIFF0000WAVE", anna))
        private = first.parent.parent  # the app's folder / a content hash / the file
        assert first.read_bytes() == b"RIFF0000WAVE" and private.name.startswith("recipebox-demo-")
        assert private.stat().st_mode & 0o777 == 0o700
        deadline = time.time() + 30
        while first.exists() and time.time() < deadline:
            time.sleep(0.5)
        assert not first.exists(), f"{first} still there after 30 s"
        second = Path(upload(url, "again.wav", b"RIFF1111WAVE", anna))
        assert second.is_relative_to(private)
    finally:
        stop_apps([proc])
    assert proc.returncode == 0 and not private.exists()  # stopped by SIGTERM as by Ctrl-C: folder removed
    for bad in ("0", "inf", "1e307"):
        with pytest.raises(SystemExit) as stopped:
            main([str(export), "--cache-minutes", bad])
        assert stopped.value.code == 2


def test_an_auth_file_others_can_read_or_without_logins_stops_before_serving(tmp_path, capsys):
    """--auth-file refuses, naming the file and the fix, a file group or others can read, a line that is not
    user:password, a file with no login and a missing file: exit 2 before the model loads."""
    from demos.app import main

    export = tiny_gpt2_export(tmp_path / "lm")
    logins = tmp_path / "logins"
    cases = {
        ("anna:pw\n", 0o644): f"is open to other users (mode 644); chmod 600 {logins}",
        ("anna:pw\nbob\n", 0o600): "line 2 is not user:password",
        ("anna:pw\nanna:other\n", 0o600): "line 2 names anna again",
        ("anna:\n", 0o600): "line 1 is not user:password",
        ("# nobody yet\n\n", 0o600): "holds no user:password line",
    }
    for (text, mode), message in cases.items():
        logins.write_text(text)
        logins.chmod(mode)
        assert main([str(export), "--auth-file", str(logins)]) == 2
        assert message in capsys.readouterr().err
    assert main([str(export), "--auth-file", str(tmp_path / "none")]) == 2
    assert f"--auth-file {tmp_path / 'none'} is not readable" in capsys.readouterr().err


def test_a_long_prompt_a_shared_seed_and_a_wrong_app_get_answers_not_errors(tmp_path):
    """In process, on a tiny GPT-2 with a 32-token window: a prompt longer than the window leaves for the
    new tokens is read from its end (it ran past the position table: IndexError); too many new tokens for
    any prompt is a message; the same seed gives the same text; --concurrency 0 and an --app that does not
    fit the export stop with exit 2 before serving."""
    from demos import causal_lm as demo
    from demos.app import main

    export = tiny_gpt2_export(tmp_path / "lm")
    long = "The harbour saw ships arrive in spring and leave in autumn. " * 10
    text, note = demo.continue_text(export, long, 8, 1.0, 1.0, 0)
    assert isinstance(text, str) and "in the model's 32-token window, it read the last 24" in note
    assert demo.continue_text(export, long, 40, 1.0, 1.0, 0) == (
        "",
        f"**--max-new-tokens 40 leaves no room for a prompt in {export}'s 32-token window; ask for fewer**",
    )
    assert demo.continue_text(export, "The harbour", 8, 1.0, 1.0, None) == demo.continue_text(
        export, "The harbour", 8, 1.0, 1.0, 0
    )  # an emptied seed box is seed 0
    # Characters the tokenizer never saw are bytes: a cut inside one re-encodes longer, and is cut again.
    for start in range(4):
        text, note = demo.continue_text(export, "港口的船在春天到达。" * 6 + "x" * start, 8, 1.0, 1.0, 0)
        assert int(note.split("read the last ")[1].rstrip(".")) <= 24
    from recipes import causal_lm

    assert isinstance(
        causal_lm.generate_text(str(export), "The harbour", temperature=0), str
    )  # no max_new_tokens
    with pytest.raises(SystemExit) as stopped:
        main([str(export), "--concurrency", "0"])
    assert stopped.value.code == 2
    assert main([str(export), "--app", "ner"], block=False) == 2


def test_the_demo_for_each_model_class_is_the_recipe_that_exports_it():
    """demos/ does not import checkpoints/, so the app table and the export check each hold the suffixes."""
    from demos.common import APPS
    from recipebox.checkpoints.export import TASK_HEADS

    assert APPS == {suffix: task for task, suffixes in TASK_HEADS.items() for suffix in suffixes}


def test_an_examples_file_that_is_not_a_table_of_texts_gives_a_page_without_examples(tmp_path):
    """examples.json is read from an export someone may have edited or shared: anything but
    {endpoint: [[text or number, ...], ...]} means no examples, not an app that fails to start."""
    from demos.common import examples

    cases = {
        '{"transcribe": [["examples/a.wav"]], "other": [["x"]]}': [["examples/a.wav"]],
        "[1, 2]": [],
        '{"transcribe": "a.wav"}': [],
        '{"transcribe": [["Then,", 24]]}': [["Then,", 24]],  # a causal LM's prompt and token count
        '{"transcribe": [[{"a": 1}]]}': [],
        '{"transcribe": ["a.wav"]}': [],
        "not json": [],
    }
    for text, rows in cases.items():
        (tmp_path / "examples.json").write_text(text, encoding="utf-8")
        assert examples(tmp_path, "transcribe") == rows, text
