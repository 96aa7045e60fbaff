"""The ``gpubridge`` command line (typer + rich).

Exit codes: 0 success; 1 the job failed or was cancelled; 2 bad usage, workflow or configuration;
3 the provider is unreachable or refused our credentials; 4 the job timed out; 130 interrupted (SIGINT);
143 terminated (SIGTERM, as sent by ``timeout``, systemd and Kubernetes). On either signal a running job is
cancelled at the backend before the command exits.
Progress goes to stderr, so ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_models import models_app
from .cli_route import register as register_route
from .cli_serve import register as register_serve
from .cli_shadow import shadow_app
from .cli_templates import templates_app
from .config import Settings
from .errors import (
    AuthError,
    ConfigError,
    GpuBridgeError,
    JobTimeout,
    PayloadTooLarge,
    ProviderError,
    WorkflowError,
)
from .models import EventType, JobEvent, JobRequest, JobResult, JobStatus, Workflow
from .plugins import get_registry

T = TypeVar("T")

app = typer.Typer(
    name="gpubridge",
    help="Run ComfyUI workflows on GPU backends (local ComfyUI, Modal, RunPod) through one runner.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
testing_app = typer.Typer(help="Test doubles that serve real protocols on loopback.", no_args_is_help=True)
app.add_typer(testing_app, name="testing")
app.add_typer(shadow_app, name="shadow")
app.add_typer(models_app, name="models")
app.add_typer(templates_app, name="templates")
register_serve(app)
register_route(app)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

ProviderOpt = Annotated[
    str | None, typer.Option("--provider", "-p", help="Provider name (default: GPUBRIDGE_PROVIDER or 'local').")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML config file (default: GPUBRIDGE_CONFIG).")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="Override the provider's URL (e.g. a ComfyUI server).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, JobTimeout):
        return 4
    if isinstance(exc, (WorkflowError, ConfigError, PayloadTooLarge)):
        return 2
    if isinstance(exc, (ProviderError, AuthError)):
        return 3
    return 1


async def _until_terminated(coro_fn: Callable[[], Awaitable[T]], terminated: list[bool]) -> T:
    """Run ``coro_fn()``; SIGTERM cancels it as SIGINT does (so a running job is cancelled at the backend).
    A second SIGTERM, while that cleanup runs, terminates at once."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_sigterm() -> None:
        terminated.append(True)
        loop.remove_signal_handler(signal.SIGTERM)
        if task is not None:
            task.cancel()

    installed = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals here (Windows, thread)
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        installed = True
    try:
        return await coro_fn()
    finally:
        if installed and not terminated:
            loop.remove_signal_handler(signal.SIGTERM)


def _execute(coro_fn: Callable[[], Awaitable[T]], *, as_json: bool = False) -> T:
    terminated: list[bool] = []
    try:
        return asyncio.run(_until_terminated(coro_fn, terminated))
    except asyncio.CancelledError:
        if not terminated:
            raise
        err.print("terminated")
        raise typer.Exit(143) from None
    except GpuBridgeError as exc:
        if terminated:  # the cancellation surfaced as the job's own error (JobCancelled, ...)
            err.print(f"terminated ({type(exc).__name__}: {exc})")
            raise typer.Exit(143) from None
        if as_json:
            print(json.dumps({"error": exc.to_dict()}, default=str))
        else:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise typer.Exit(_exit_code(exc)) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _positive_seconds(value: float | None) -> float | None:
    """``--timeout``: a positive, finite number of seconds (0, negatives, inf and nan are usage errors)."""
    if value is not None and not (0 < value < float("inf")):
        raise typer.BadParameter(f"must be a positive number of seconds, got {value:g}")
    return value


SetOpt = Annotated[list[str], typer.Option("--set", "-s", help="NODE.input=VALUE (node id, title or class); "
                                          "VALUE is parsed as JSON when it can be.")]
InputOpt = Annotated[list[str], typer.Option("--input", "-i", help="NAME=PATH: an input file LoadImage refers to "
                                             "as NAME.")]
DeadlineOpt = Annotated[float | None, typer.Option("--timeout", "-t", help="Job deadline in seconds.",
                                                   callback=_positive_seconds)]


def _runner(provider: str | None, config: Path | None, url: str | None):
    from .connect import connect

    settings = Settings.load(config)
    options: dict[str, Any] = {"url": url} if url else {}
    return connect(provider, settings=settings, **options), settings


def _call(provider: str | None, config: Path | None, url: str | None, as_json: bool,
          method: Callable[[Any], Awaitable[T]]) -> T:
    """Open the configured runner, await ``method(runner)``, close it; errors become exit codes."""

    async def main() -> T:
        runner, _ = _runner(provider, config, url)
        async with runner:
            return await method(runner)

    return _execute(main, as_json=as_json)


def _print_status(st: JobStatus, as_json: bool) -> None:
    if as_json:
        print(st.model_dump_json(indent=2))
    else:
        out.print(_status_table(st))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _build_request(
    workflow: Path, sets: list[str], inputs: list[str], timeout: float | None
) -> JobRequest:
    wf = Workflow.load(workflow)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes NODE.input=VALUE, got {item!r}")
        wf.set(key.strip(), _parse_value(value))
    files: dict[str, Any] = {}
    for item in inputs:
        name, sep, path = item.partition("=")
        if not sep:
            p = Path(item)
            name, path = p.name, item
        files[name.strip()] = Path(path.strip()) if not path.strip().startswith(("http://", "https://")) else path
    return JobRequest(workflow=wf, inputs=files, timeout=timeout)


def _describe_event(ev: JobEvent) -> str | None:
    node = f"node {ev.node_id}" + (f" {ev.node_type}" if ev.node_type else "") if ev.node_id else ""
    if ev.type is EventType.QUEUED:
        return "queued" + (f" (position {ev.queue_position})" if ev.queue_position is not None else "")
    if ev.type is EventType.STARTED:
        return "running"
    if ev.type is EventType.EXECUTING:
        return f"running {node}"
    if ev.type is EventType.PROGRESS and ev.max:
        return f"running {node} step {int(ev.value or 0)}/{int(ev.max)}"
    if ev.type in (EventType.FAILOVER, EventType.RETRYING, EventType.LOG) and ev.message:
        return ev.message
    return None


def _result_table(result: JobResult, saved: list[Path] | None) -> Table:
    t = result.timings
    table = Table(title=f"job {result.job_id} on {result.provider}: {result.state.value}", title_justify="left")
    table.add_column("node")
    table.add_column("kind")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("dims", justify="right")
    for i, art in enumerate(result.artifacts):
        where = str(saved[i]) if saved else (art.filename or (art.text or "")[:60])
        dims = f"{art.width}x{art.height}" if art.width and art.height else ""
        size = f"{art.size:,} B" if art.size is not None else ""
        table.add_row(art.node_id, art.kind.value, where, size, dims)
    parts = []
    for label, value in (("queued", t.queued_s), ("executing", t.executing_s), ("total", t.total_s),
                         ("upload", t.upload_s), ("download", t.download_s)):
        if value is not None:
            parts.append(f"{label} {value * 1000:.1f} ms" if value < 10 else f"{label} {value:.2f} s")
    caption = "timings: " + ", ".join(parts)
    if result.cost is not None:
        caption += f"; cost ${result.cost.usd:.6f} ({result.cost.basis})"
    if len(result.attempts) > 1:
        caption += "; attempts: " + ", ".join(f"{a.provider}={a.outcome}" for a in result.attempts)
    table.caption = caption
    table.caption_justify = "left"
    return table


@app.command()
def run(
    workflow: Annotated[Path, typer.Argument(help="API-format workflow JSON (ComfyUI: Export (API)).")],
    provider: ProviderOpt = None,
    set_: SetOpt = [],  # noqa: B006
    input_: InputOpt = [],  # noqa: B006
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Write artifacts to this folder.")] = None,
    timeout: DeadlineOpt = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress.")] = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Run a workflow and wait for its outputs, with live progress."""
    run_job(lambda: _build_request(workflow, set_, input_, timeout), provider=provider, out_dir=out_dir,
            as_json=as_json, quiet=quiet, config=config, url=url)


def run_job(
    build: Callable[[], JobRequest], *, provider: str | None, out_dir: Path | None, as_json: bool, quiet: bool,
    config: Path | None, url: str | None,
) -> None:
    """Build the request, run it with live progress on stderr, print the result (and save it to ``out_dir``);
    errors become exit codes."""

    async def main() -> JobResult:
        request = build()
        runner, _ = _runner(provider, config, url)
        async with runner:
            show = not quiet and err.is_terminal
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                console=err, transient=True, disable=not show,
            ) as bar:
                task = bar.add_task(f"submitting to {runner.name}", total=None)

                def on_event(ev: JobEvent) -> None:
                    text = _describe_event(ev)
                    if text is None:
                        return
                    total = completed = None
                    if ev.type is EventType.PROGRESS and ev.max:
                        total, completed = ev.max, ev.value
                    bar.update(task, description=text, total=total, completed=completed or 0)
                    if not show and not quiet and not as_json and ev.type in (EventType.FAILOVER, EventType.RETRYING):
                        err.print(text)
                    if show and ev.type in (EventType.FAILOVER, EventType.RETRYING):
                        bar.console.print(f"[yellow]{text}[/]")

                return await runner.run(request, on_event=on_event)

    result = _execute(main, as_json=as_json)
    saved = result.save(out_dir) if out_dir else None
    if as_json:
        summary = result.summary()
        if saved:
            for art, path in zip(summary["artifacts"], saved, strict=False):
                art["path"] = str(path)
        print(json.dumps(summary, indent=2, default=str))
    else:
        out.print(_result_table(result, saved))
        if not out_dir and any(a.data for a in result.artifacts):
            err.print("(use --out DIR to save the artifacts)")


@app.command()
def submit(
    workflow: Annotated[Path, typer.Argument(help="API-format workflow JSON.")],
    provider: ProviderOpt = None,
    set_: SetOpt = [],  # noqa: B006
    input_: InputOpt = [],  # noqa: B006
    timeout: DeadlineOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Submit a workflow and print its job id without waiting."""

    async def submit_it(runner):
        return await runner.submit(_build_request(workflow, set_, input_, timeout))

    handle = _call(provider, config, url, as_json, submit_it)
    if as_json:
        print(handle.model_dump_json(indent=2))
    else:
        print(handle.job_id)


def _status_table(st: JobStatus) -> Table:
    table = Table(show_header=False, title=f"job {st.job_id}", title_justify="left")
    table.add_row("provider", st.provider)
    table.add_row("state", st.state.value)
    if st.queue_position is not None:
        table.add_row("queue position", str(st.queue_position))
    if st.progress and st.progress.node_id:
        step = f" step {st.progress.value:g}/{st.progress.max:g}" if st.progress.max else ""
        table.add_row("progress", f"node {st.progress.node_id} ({st.progress.node_type}){step}")
    if st.error:
        table.add_row("error", f"{st.error.get('type')}: {st.error.get('message')}")
    return table


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="The job id printed by submit.")],
    provider: ProviderOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Show a job's state, progress and queue position."""
    _print_status(_call(provider, config, url, as_json, lambda runner: runner.status(job_id)), as_json)


@app.command()
def result(
    job_id: Annotated[str, typer.Argument(help="The job id printed by submit.")],
    provider: ProviderOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Write artifacts to this folder.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", "-t", help="Stop waiting after S seconds.",
                                                  callback=_positive_seconds)] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Wait for a submitted job and fetch its outputs."""
    res = _call(provider, config, url, as_json, lambda runner: runner.wait(job_id, timeout=timeout))
    saved = res.save(out_dir) if out_dir else None
    if as_json:
        print(json.dumps(res.summary(), indent=2, default=str))
    else:
        out.print(_result_table(res, saved))


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job id printed by submit.")],
    provider: ProviderOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Cancel a job: remove it from the queue, or interrupt it if it runs."""
    _print_status(_call(provider, config, url, as_json, lambda runner: runner.cancel(job_id)), as_json)


@app.command()
def health(
    provider: ProviderOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Check the provider's health (and that of its fallbacks, when configured)."""
    report = _call(provider, config, url, as_json, lambda runner: runner.health())
    if as_json:
        print(report.model_dump_json(indent=2))
        raise typer.Exit(0 if report.ok else 3)
    table = Table(title=f"health of {report.provider}", title_justify="left", show_header=False)
    colour = {"healthy": "green", "degraded": "yellow"}.get(report.state.value, "red")
    table.add_row("state", f"[{colour}]{report.state.value}[/]")
    for label, value in (("message", report.message), ("latency", f"{report.latency_ms} ms" if report.latency_ms
                         is not None else None), ("version", report.version), ("queue depth", report.queue_depth),
                         ("running", report.running), ("workers", report.workers)):
        if value is not None:
            table.add_row(label, str(value))
    for key, value in report.details.items():
        if key in ("components", "routes"):
            continue
        table.add_row(key, json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
    out.print(table)
    components = report.details.get("components")
    if isinstance(components, list) and components:
        routed = any("routes" in c for c in components)
        sub = Table(title="components", title_justify="left")
        for col in ("provider", *(("type", "routes") if routed else ()), "state", "circuit", "message"):
            sub.add_column(col)
        for c in components:
            cells = [str(c.get("provider"))]
            if routed:
                cells += [str(c.get("type", "")), ", ".join(c.get("routes") or [])]
            sub.add_row(*cells, str(c.get("state")), str(c.get("circuit", "")), str(c.get("message") or ""))
        out.print(sub)
    if not report.ok:
        raise typer.Exit(3)


@app.command()
def check(
    workflow: Annotated[Path, typer.Argument(help="API-format workflow JSON.", exists=True, dir_okay=False)],
    provider: ProviderOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Can each provider run WORKFLOW? Names missing node classes (and their node pack) and model files,
    and what is wrong everywhere (dangling links, no output node). Exit 1 when no provider can run it."""
    from .comfy.preflight import preflight

    settings = Settings.load(config)
    names = [provider] if provider else [settings.provider, *[f for f in settings.fallbacks if f != settings.provider]]
    prompt = Workflow.load(workflow).to_api()

    async def main() -> dict[str, Any]:
        registry = get_registry()
        found: dict[str, Any] = {}
        for name in names:
            options: dict[str, Any] = {"url": url} if url and name == names[0] else {}
            runner = registry.create_runner(name, settings, **options)
            try:
                info = await runner.capabilities()
            finally:
                await runner.aclose()
            if info is None:
                found[name] = {"can_run": None, "problems": [], "note": "this provider cannot report what it can run"}
                continue
            problems = preflight(prompt, info)
            found[name] = {"can_run": not problems, "problems": [p.to_dict() for p in problems]}
        return found

    results = _execute(main, as_json=as_json)
    runnable = any(r["can_run"] is not False for r in results.values())
    if as_json:
        print(json.dumps({"workflow": str(workflow), "providers": results}, indent=2))
    else:
        table = Table(title=f"can each provider run {workflow.name}?", title_justify="left")
        table.add_column("provider", style="bold")
        table.add_column("can run")
        table.add_column("why not")
        for name, r in results.items():
            verdict = {True: "[green]yes[/]", False: "[red]no[/]", None: "[yellow]unknown[/]"}[r["can_run"]]
            why = "\n".join(p["message"] for p in r["problems"]) or r.get("note", "")
            table.add_row(name, verdict, why)
        out.print(table)
    raise typer.Exit(0 if runnable else 1)


@app.command()
def lock(
    comfyui: Annotated[Path, typer.Option(help="A ComfyUI checkout, or a bare git directory of ComfyUI.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The lock file to write.")],
    requirements: Annotated[list[Path] | None, typer.Option(
        "--requirements", "-r", help="More requirements (the image's own packages, torch, custom nodes').")] = None,
    rev: Annotated[str | None, typer.Option(help="The ComfyUI commit or tag to read (default: HEAD).")] = None,
    python: Annotated[str, typer.Option(help="The image's Python, major.minor.")] = "3.11",
    platform: Annotated[str, typer.Option(help="uv's --python-platform for the image.")] = "x86_64-manylinux_2_28",
    index_url: Annotated[str | None, typer.Option(help="Package index (default: uv's, PyPI).")] = None,
    find_links: Annotated[list[str] | None, typer.Option(help="Extra wheel folders or pages.")] = None,
    no_index: Annotated[bool, typer.Option(help="Resolve from --find-links only.")] = False,
) -> None:
    """Resolve ComfyUI's requirements (at one commit) plus -r files into a hashed lock for an image build.
    The lock's first line names the ComfyUI version and commit; the Modal image refuses a lock made from
    another ComfyUI."""
    from .lock import make_lock, read_comfy_source

    try:
        source = read_comfy_source(comfyui, rev)
        made = make_lock(source, list(requirements or []), output, python=python, platform=platform,
                         index_url=index_url, find_links=find_links, no_index=no_index)
    except ConfigError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    err.print(f"{output}: {len(made.pins)} packages for ComfyUI {source.version} ({source.commit[:12]}), "
              f"Python {python} on {platform}")
    for problem in made.problems:
        err.print(f"[yellow]{problem}[/]")
    raise typer.Exit(1 if made.problems else 0)


@app.command()
def providers(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List the registered providers (types), the configured instances ([providers.NAME] with their type and
    the routes that use them), and plugins that failed to load."""
    registry = get_registry()
    specs = registry.providers()
    failures = registry.failures
    settings = Settings.load(config)
    used: dict[str, list[str]] = {}
    for i, route in enumerate(settings.routes):
        if isinstance(route, dict):
            for name in [*(route.get("providers") or []), *([route["shadow"]] if route.get("shadow") else [])]:
                used.setdefault(str(name), []).append(str(route.get("name", f"route-{i + 1}")))
    for name in [settings.provider, *settings.fallbacks, *([settings.shadow] if settings.shadow else [])]:
        used.setdefault(name, []).append("default")
    instances = [{"name": n, "type": settings.provider_type(n), "routes": used.get(n, [])}
                 for n in sorted(set(settings.providers) | set(used))]
    if as_json:
        print(json.dumps({
            "providers": [{"name": s.name, "source": s.source, "plugin": s.plugin, "description": s.description}
                          for s in specs.values()],
            "instances": instances,
            "failures": [{"plugin": f.plugin, "source": f.source, "error": f.error} for f in failures],
        }, indent=2))
        return
    table = Table(title="providers", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("source")
    table.add_column("description")
    for spec in specs.values():
        table.add_row(spec.name, spec.source, spec.description)
    out.print(table)
    inst = Table(title="configured instances", title_justify="left")
    for col in ("name", "type", "routes"):
        inst.add_column(col)
    for i in instances:
        inst.add_row(i["name"], i["type"] if i["type"] in specs else f"[red]{i['type']} (unknown)[/]",
                     ", ".join(i["routes"]) or "-")
    out.print(inst)
    if failures:
        bad = Table(title="plugins that failed to load", title_justify="left")
        bad.add_column("plugin")
        bad.add_column("source")
        bad.add_column("error", style="red")
        for f in failures:
            bad.add_row(f.plugin, f.source, f.error)
        out.print(bad)


@testing_app.command(
    "comfy", add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def testing_comfy(ctx: typer.Context) -> None:
    """Serve the ComfyUI test double (ComfyUI's HTTP and websocket API, placeholder outputs, faults).
    The options are python -m gpubridge.testing.comfy's: see --help."""
    try:
        from .testing.comfy._serve import main as serve_main
    except ImportError as exc:  # aiohttp/pillow missing
        err.print(f"The test double needs the 'testing' extra: pip install 'gpubridge[testing]' ({exc})")
        raise typer.Exit(2) from None
    raise typer.Exit(serve_main(ctx.args, prog="gpubridge testing comfy"))


def main(argv: list[str] | None = None) -> None:
    get_registry().call_commands(app)
    app(args=argv, prog_name="gpubridge")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
