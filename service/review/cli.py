"""`rlaif review DIR [--port 8010]` and `rlaif review export DIR --out FILE`.

`rlaif review DIR` serves the review page for a `rlaif label` folder, an `rlaif eval --out` folder or a
human-preference file, on 127.0.0.1:8010 by default; answers go to SQLite beside it. `rlaif review
export DIR --out FILE` writes the human labels as a preference file (and, for label folders, the
dataset with human-corrected labels) and prints a JSON summary. (A folder that is itself named
`export` is reviewed as `./export`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rlaif.judge.cli import UserError, print_json, user_errors


def register(app: typer.Typer) -> None:
    @app.command("review")
    def review(
        target: Annotated[str, typer.Argument(help="Folder or file to review, or `export` followed by it.", metavar="DIR|export")],
        export_dir: Annotated[Optional[Path], typer.Argument(help="With `export`: the reviewed folder or file.", metavar="[DIR]")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="export: preference file to write (jsonl).")] = None,
        corrected: Annotated[Optional[Path], typer.Option("--corrected", help="export: the human-corrected dataset (default <out>.corrected.jsonl; label folders only).")] = None,
        only: Annotated[Optional[str], typer.Option("--only-annotator", help="export: only this annotator's answers.")] = None,
        host: Annotated[Optional[str], typer.Option("--host", help="Interface (default 127.0.0.1); anything else needs API keys.")] = None,
        port: Annotated[Optional[int], typer.Option("--port", help="TCP port (default 8010).")] = None,
        annotator: Annotated[Optional[str], typer.Option("--annotator", help="Name recorded with answers when no API keys are set.")] = None,
        api_keys: Annotated[Optional[str], typer.Option("--api-keys", help="Comma-separated name:key pairs (prefer RLAIF_REVIEW_API_KEYS).")] = None,
        blind: Annotated[bool, typer.Option("--blind", help="Hide the judge's verdict until a pair is answered.")] = False,
    ) -> None:
        """Review AI labels in the browser (answers saved to SQLite), or `export` the human labels."""
        with user_errors():
            from rlaif.judge.labeling.review import HumanLabelStore, export, load_review_source

            if target == "export":
                if export_dir is None or out is None:
                    raise UserError("usage: rlaif review export DIR --out FILE")
                source = load_review_source(export_dir)
                if not source.store_path.is_file():
                    raise UserError(f"{export_dir}: no human labels yet ({source.store_path} does not exist)")
                store = HumanLabelStore(source.store_path)
                try:
                    print_json(export(source, store, out, corrected=corrected, annotator=only))
                finally:
                    store.close()
                return
            if export_dir is not None:
                raise UserError(f"unexpected argument {export_dir}; to export: rlaif review export DIR --out FILE")
            _serve(Path(target), host=host, port=port, annotator=annotator, api_keys=api_keys, blind=blind)


def _serve(path: Path, **overrides: Any) -> None:
    import uvicorn

    from rlaif.judge.labeling.review import load_review_source
    from rlaif.service.review.app import create_review_app
    from rlaif.service.review.settings import ReviewSettings

    settings = ReviewSettings(**{k: v for k, v in overrides.items() if v is not None and v is not False})
    if not settings.is_loopback and not settings.named_keys():
        raise UserError(f"--host {settings.host} without API keys would let anyone on the network label; "
                        "set RLAIF_REVIEW_API_KEYS=name:key,...")
    source = load_review_source(path)
    if not source.items:
        raise UserError(f"{path}: no pairs to review")
    app = create_review_app(settings, source)
    typer.echo(f"reviewing {len(source.items)} pairs of {path} ({source.kind}); answers go to {source.store_path}", err=True)
    typer.echo(f"open http://{settings.host}:{settings.port}/ in a browser", err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
