"""What every demo app shares: safe settings, finding the export and its app, examples, and the launch.

An app is a module in demos/ with `build(export: Path) -> gradio.Blocks`; every button's
function is a module-level function with a named API endpoint (`api_name`), so the page, `gradio_client` and
a test all call the same thing. The inference itself is the recipe's own (`recipes/<task>.py`: `predict`
and friends, which use `transformers.pipeline` where transformers 5 has one for the task).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A clip of 10 minutes (the speech app's cap) is at most about 110 MB as 48 kHz stereo WAV.
MAX_UPLOAD = "200mb"

# Set before gradio (or huggingface_hub) is imported: no analytics or telemetry threads (they can keep the
# process alive on a network that accepts and never answers), no hub downloads, localhost never proxied.
QUIET = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}

# The app for an export, by the suffix of its model class (config.json "architectures"); the recipes' own
# check is checkpoints.export.TASK_HEADS (demos do not import checkpoints); a test holds the two alike.
APPS = {
    "ForPreTraining": "mlm_nsp",
    "ForSequenceClassification": "text_classification",
    "ForTokenClassification": "ner",
    "ForQuestionAnswering": "qa",
    "ForQuestionAnsweringSimple": "qa",  # XLNet, XLM
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",  # GPT2LMHeadModel
    "ForConditionalGeneration": "summarization",  # T5, BART, Pegasus
    "MTModel": "summarization",  # MarianMTModel
    "ForCTC": "asr_ctc",  # Wav2Vec2ForCTC
}


class DemoError(Exception):
    """A problem the user fixes (wrong folder, unknown model class): printed as `error: ...`, exit code 2."""


def quiet_environment() -> None:
    os.environ.update(QUIET)
    if not os.environ.get("GRADIO_TEMP_DIR"):  # uploads in a folder of this app's own (0700), not a shared
        private = tempfile.mkdtemp(prefix="recipebox-demo-")  # /tmp/gradio another user may own
        os.environ["GRADIO_TEMP_DIR"] = private
        atexit.register(shutil.rmtree, private, ignore_errors=True)
    local = "127.0.0.1,localhost"
    for key in ("NO_PROXY", "no_proxy"):
        os.environ[key] = f"{os.environ[key]},{local}" if os.environ.get(key) else local
    if str(REPO) not in sys.path:
        sys.path.insert(
            0, str(REPO)
        )  # the recipes' inference functions (`python demos/app.py` runs from demos/)


def find_export(path: str | Path) -> Path:
    """An export folder (config.json and safetensors weights), or a run folder holding one in export/."""
    path = Path(path)
    if not path.exists():
        raise DemoError(f"{path} does not exist; pass an export folder (RUN/export) or a run folder")
    export = path / "export" if (path / "export" / "config.json").is_file() else path
    if not (export / "config.json").is_file():
        raise DemoError(f"{path} holds no exported model (no config.json); train first or pass RUN/export")
    if not any(export.glob("*.safetensors")) and not (export / "model.safetensors.index.json").is_file():
        raise DemoError(f"{export} has a config.json but no safetensors weights; export it again")
    return export


def app_for(export: Path) -> str:
    """The app name for an export, from its model class."""
    try:
        config = json.loads((export / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DemoError(
            f"{export / 'config.json'} is not readable JSON ({err}); export the model again"
        ) from err
    archs = (config.get("architectures") if isinstance(config, dict) else None) or []
    for arch in archs:
        for suffix, app in APPS.items():
            if arch.endswith(suffix):
                return app
    known = ", ".join(f"*{s}" for s in APPS)
    raise DemoError(f"{export}: no demo app for model class {archs or '(none)'}; apps exist for {known}")


def examples(export: Path, endpoint: str) -> list[list]:
    """The held-out inputs the recipe saved with the export for one endpoint: rows of texts and numbers (a
    causal LM's prompt and token count). None for other exports, or where examples.json is not such a table
    (a page without examples, not one that fails to start)."""
    path = export / "examples.json"
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return []
    rows = rows.get(endpoint, []) if isinstance(rows, dict) else []
    values = (str, int, float)
    if isinstance(rows, list) and all(
        isinstance(r, list) and all(isinstance(v, values) for v in r) for r in rows
    ):
        return rows
    return []


def read_auth_file(path: str | Path) -> list[tuple[str, str]]:
    """The logins of `--auth-file`: one `user:password` a line (spaces around either ignored, blank lines
    and `# ...` skipped), from a file only its owner can read or change, as ssh wants of a key."""
    path = Path(path)
    try:
        with open(path, "rb") as f:  # the mode of the file read, not of one put in its place meanwhile
            mode = os.fstat(f.fileno()).st_mode
            lines = f.read().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DemoError(
            f"--auth-file {path} is not readable ({err}); write user:password lines in it"
        ) from err
    if mode & 0o077:
        raise DemoError(
            f"--auth-file {path} is open to other users (mode {mode & 0o777:o}); chmod 600 {path}"
        )
    logins: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, password = (part.strip() for part in line.partition(":"))
        if not (colon and user and password):
            raise DemoError(f"--auth-file {path} line {number} is not user:password (both non-empty)")
        if user in logins:
            raise DemoError(f"--auth-file {path} line {number} names {user} again; keep one line per user")
        logins[user] = password
    if not logins:
        raise DemoError(f"--auth-file {path} holds no user:password line; add one")
    return list(logins.items())


def launch(
    blocks,
    *,
    host: str,
    port: int | None,
    share: bool,
    concurrency: int,
    cache_minutes: float = 60,
    auth: list[tuple[str, str]] | None = None,
    block: bool = True,
):
    """Serve on host:port (127.0.0.1 unless asked): at most `concurrency` predictions at once, 64 waiting.
    Uploaded files (clips, on a shared machine) are deleted once older than `cache_minutes`, checked as
    often, and all of them when the app stops. With `auth` (user, password) pairs, the page, its API and
    uploads answer only after a login."""
    seconds = max(1, round(cache_minutes * 60))
    blocks.delete_cache = (seconds, seconds)
    blocks.queue(default_concurrency_limit=concurrency, max_size=64)
    blocks.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        show_error=False,
        max_file_size=MAX_UPLOAD,
        auth=auth or None,
        auth_message="Log in with a user and password from the app's --auth-file.",
    )
    return blocks
