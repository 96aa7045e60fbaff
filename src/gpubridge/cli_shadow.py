"""``gpubridge shadow``: the migration report and the configured stage.

``report`` exits 0, or with ``--check`` 1 when the verdict is not ``go`` (for a CI gate or a cron job). It
judges one (control, candidate) provider pair: ``--control``/``--candidate``, by default the pair of the
most recent record.
"""

from __future__ import annotations

import enum
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .config import Settings
from .errors import ConfigError

__all__ = ["shadow_app", "parse_since"]

shadow_app = typer.Typer(
    help="Shadow traffic and canary: the migration report and the configured stage.", no_args_is_help=True
)

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False)
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    html = "html"


def parse_since(text: str, *, now: float | None = None) -> float:
    """Epoch seconds from ``30m``/``24h``/``7d``/``2w`` (ago), or an ISO date or datetime (UTC if naive)."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: use a duration (30m, 24h, 7d, 2w) or an ISO date/time (2025-05-01, 2025-05-01T12:00)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


@shadow_app.command("report")
def report(
    since: Annotated[str | None, typer.Option("--since", help="Only records since: 24h, 7d, or an ISO "
                                              "date/time (UTC).")] = None,
    format: Annotated[Format, typer.Option("--format", "-f", help="table, json or html.")] = Format.table,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the report to this file.")] = None,
    db: Annotated[Path | None, typer.Option(
        "--db", help="SQLite file (default: the db of the \\[shadow_options] table).")]
    = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 unless the verdict is go.")] = False,
    control: Annotated[str | None, typer.Option("--control", help="Control provider to judge (default: the "
                                                "configured provider when no record names one, else that of "
                                                "the latest record).")] = None,
    candidate: Annotated[str | None, typer.Option("--candidate", help="Candidate provider to judge (default: "
                                                  "the configured shadow when no record names one, else that "
                                                  "of the latest record).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML config file.")] = None,
) -> None:
    """Figures per workflow and overall, and the go/no-go verdict, from the shadow records."""
    from .shadow.report import Verdict, build_report, render_html, render_json, render_table
    from .shadow.store import read_records

    try:
        settings = Settings.load(config)
        start = parse_since(since) if since else None
        until = time.time()
        if db is None and settings.database_url is not None:
            from .errors import redact_url
            from .shadow.store import read_records_pg

            url = settings.database_url.get_secret_value()
            path = redact_url(url)
            records = read_records_pg(url, since=start, until=until)
        else:
            path = db or settings.shadow_options.db_path()
            records = read_records(path, since=start, until=until)
    except ConfigError as exc:
        _err.print(f"[bold red]error[/]: {exc}")
        raise typer.Exit(2) from None
    rep = build_report(records, settings.shadow_options, since=start, until=until, control=control,
                       candidate=candidate, configured=(settings.provider, settings.shadow))
    if not records:
        _err.print(f"no shadow records in {path}" + (f" since {since}" if since else ""))
    if format is Format.table:
        if out:
            with out.open("w", encoding="utf-8") as fh:
                Console(file=fh, width=160, highlight=False).print(render_table(rep))
        else:
            _out.print(render_table(rep, width=_out.width))
    else:
        text = render_json(rep) if format is Format.json else render_html(rep)
        if out:
            out.write_text(text, encoding="utf-8")
        else:
            print(text)
    if out:
        _err.print(f"wrote {out} (verdict: {rep.verdict.value})")
    if check and rep.verdict is not Verdict.GO:
        raise typer.Exit(1)


@shadow_app.command("stage")
def stage(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="TOML config file.")] = None,
) -> None:
    """Show the configured migration stage (off, shadow, canary, cutover) and its providers."""
    from .shadow.stages import describe_stage

    try:
        info = describe_stage(Settings.load(config))
    except ConfigError as exc:
        _err.print(f"[bold red]error[/]: {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(info))
    else:
        _out.print(", ".join(f"{k}: {v}" for k, v in info.items()))
