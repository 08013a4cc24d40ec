"""Try an exported model in the browser: a Gradio app chosen from the export's model class.

    python demos/app.py runs/ner/export                   # prints the local URL (http://127.0.0.1:7860)
    python demos/app.py runs/toxic/export --port 7861
    python demos/app.py runs/quickstart                   # a run folder: its export/
    python demos/app.py runs/t5/export runs/bart/export   # summarisation: up to 3 models side by side
    python demos/app.py EXPORT --auth-file ~/.demo_logins  # a login first (user:password lines, chmod 600)
    python demos/app.py EXPORT --host 0.0.0.0 --auth-file ~/.demo_logins  # every interface, with a login

Apps: BERT MLM+NSP (fill-mask, is-next), text classification (scores, fitted thresholds), NER (entities
highlighted), extractive QA, text generation, summarisation (several exports side by side), speech
recognition (upload or record a clip). Each button is
also an API endpoint: see the page's "Use via API" link, or
`gradio_client.Client(URL).predict(TEXT, api_name="/tag")`.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demos.common import (  # noqa: E402
    APPS,
    DemoError,
    app_for,
    find_export,
    launch,
    quiet_environment,
    read_auth_file,
)

MAX_CACHE_MINUTES = 525_600  # a year


def _app(export: Path, asked: str | None) -> str:
    """The app for an export: from its model class; --app where the class is one no app knows, and only
    when it agrees where one does (another task's export would load with a new, random head)."""
    try:
        found = app_for(export)
    except DemoError:
        if asked:
            return asked
        raise
    if asked and asked != found:
        raise DemoError(f"{export} holds a {found} model; --app {asked} does not fit it (leave --app out)")
    return found


def main(argv: list[str] | None = None, block: bool = True):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "export", nargs="+", help="an export folder (RUN/export) or a run folder; summarisation: 1 to 3"
    )
    parser.add_argument(
        "--app", choices=sorted(set(APPS.values())), help="the app (default: from the export)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default: this machine only)"
    )
    parser.add_argument("--port", type=int, default=None, help="default: the first free one from 7860")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=2, help="predictions run at once (default 2)")
    parser.add_argument(
        "--cache-minutes",
        type=float,
        default=60,
        help="uploads older than this are deleted, checked as often; all when the app stops (default 60)",
    )
    parser.add_argument(
        "--auth-file",
        help="ask for a login: a file of user:password lines only you can read (chmod 600); on a shared "
        "node every user can reach 127.0.0.1",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error(f"--concurrency must be 1 or more, got {args.concurrency}")
    if not 0 < args.cache_minutes <= MAX_CACHE_MINUTES:
        parser.error(
            f"--cache-minutes must be over 0 and at most {MAX_CACHE_MINUTES} (a year), got {args.cache_minutes}"
        )
    try:
        auth = read_auth_file(args.auth_file) if args.auth_file else None
        exports = [find_export(e) for e in args.export]
        names = {_app(e, args.app) for e in exports}
        if len(names) > 1:
            raise DemoError(f"the exports need different apps ({', '.join(sorted(names))}); pass one kind")
        name = names.pop()
        if len(exports) > 1 and name != "summarization":
            raise DemoError(
                f"the {name} app shows one export; pass one (only summarisation compares several)"
            )
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    quiet_environment()  # before gradio is imported; it makes the app's private upload folder
    if block:  # `kill` or a scheduler's SIGTERM stops the app as Ctrl-C does: that folder is removed
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        app = importlib.import_module(f"demos.{name}")
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        print(
            'error: gradio is not installed: pip install -e ".[demo]" (scripts/env.sh does)', file=sys.stderr
        )
        return 2
    try:
        blocks = app.build(*exports)
    except (DemoError, ValueError, RuntimeError) as err:  # e.g. --app for another task's export
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.share and not auth:
        print("warning: --share opens a public gradio.live link (it needs the internet): anyone with the link "
              "can use this app and the machine it runs on; add --auth-file", file=sys.stderr)  # fmt: skip
    elif args.host not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(f"warning: --host {args.host} serves anyone who reaches this machine; add --auth-file",
              file=sys.stderr)  # fmt: skip
    try:
        return launch(blocks, host=args.host, port=args.port, share=args.share, concurrency=args.concurrency,
                      cache_minutes=args.cache_minutes, auth=auth, block=block)  # fmt: skip
    except OSError as err:  # the port is taken, or the host is not an address of this machine
        print(
            f"error: cannot serve on {args.host}:{args.port}: {err}; pick another --port or --host",
            file=sys.stderr,
        )
        return 2


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # stopped while the model was still loading
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
