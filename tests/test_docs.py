"""Docs that stay true (issue 25): every fenced shell and Python block of the user-facing Markdown runs.

The collector reads README.md, docs/*.md and the RunPod worker's README with markdown-it (rich's own
Markdown parser) and makes one test per ``bash``/``sh``/``shell``/``python`` block. A block runs as a new
user would run it: in a fresh folder that sees the repository's files (``examples/``, ``contrib/``, ...),
with this virtualenv's ``gpubridge`` and ``python`` first on PATH, against one ComfyUI double served for the
module on a free port. The docs name the double's address ``http://127.0.0.1:8189`` (``DOCS_DOUBLE``);
it is rewritten to the real one, and ``GPUBRIDGE_COMFY_URL``/``COMFY_URL`` point there too.

An HTML comment right before a block steers it:

- ``<!-- docs-test: skip reason="..." -->``: not runnable here (cloud credentials, models, GPUs, a
  long-running server, package installs); the reason is required and shows in the test report.
- ``<!-- docs-test: run exit=N -->``: runs and must exit with N (default 0).
- ``<!-- docs-test: output json -->`` / ``output text`` before a ``json``/``text`` block that follows a
  run block: what the docs show that block printing, checked against its output (stdout and stderr in one
  stream, as a terminal shows them). ``json``: the first line that starts a JSON document starts one of
  that shape (``...`` stands for any value, any further members or items; a documented ``null`` must be
  null, a number a non-negative number when the docs show one). ``text``: each documented line matches a
  line of the output, in order (``...`` matches anything within a line).

A block with no comment runs. A comment the collector does not understand, a skip without a reason or an
output block with nothing to check fails the collection, so no block can be left unchecked by accident.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "contrib" / "runpod_worker" / "README.md"]
SHELL = {"bash", "sh", "shell"}
PYTHON = {"python", "py"}
DOCS_DOUBLE = "127.0.0.1:8189"  # where the docs tell a reader to run the ComfyUI double
BLOCK_TIMEOUT = 90
TABLE_DIRECTIVES = {"options", "commands", "settings"}  # before a table (settings: or a paragraph)
_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->", re.S)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None
    exit: int = 0
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (json|text, documented output)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _directive(token: Any) -> tuple[str, dict[str, str]] | None:
    if token is None or token.type != "html_block":
        return None
    found = _DIRECTIVE.search(token.content)
    if found is None:
        return None
    words = shlex.split(found.group(1))
    if not words:
        raise ValueError("empty docs-test comment")
    options: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        options[key] = value if sep else ""
    return words[0], options


def collect(path: Path) -> list[Block]:
    """The shell and Python blocks of one Markdown file, with their directives; raises on a bad comment."""
    tokens = MarkdownIt("commonmark").enable("table").parse(path.read_text())
    blocks: list[Block] = []
    last_run: Block | None = None
    for i, token in enumerate(tokens):
        if token.type == "html_block" and i + 1 < len(tokens) and tokens[i + 1].type != "fence":
            directive = _directive(token)
            before = tokens[i + 1].type
            if directive is not None and not (
                directive[0] in TABLE_DIRECTIVES
                and (before == "table_open" or (before == "paragraph_open" and directive[0] == "settings"))
            ):
                raise ValueError(f"{path.relative_to(ROOT)}:{token.map[0] + 1}: {directive[0]!r} here checks "
                                 f"nothing (a block directive before a non-block, or an unknown one)")
        if token.type != "fence":
            continue
        where = f"{path.relative_to(ROOT)}:{token.map[0] + 1}"
        lang = (token.info.split() or [""])[0].lower()
        directive = _directive(tokens[i - 1] if i else None)
        if directive is not None and directive[0] == "output":
            kind = next(iter(directive[1]), "text")
            if kind not in ("json", "text") or last_run is None or not token.content.strip():
                raise ValueError(f"{where}: 'output' needs json or text and a run block before it")
            last_run.outputs.append((kind, token.content))
            continue
        if lang not in SHELL | PYTHON:
            if directive is not None:
                raise ValueError(f"{where}: a docs-test comment before a {lang or 'plain'} block")
            continue
        block = Block(path, token.map[0] + 1, lang, token.content)
        if directive is None or directive[0] == "run":
            options = directive[1] if directive else {}
            unknown = set(options) - {"exit"}
            if unknown:
                raise ValueError(f"{where}: unknown run options {sorted(unknown)}")
            block.exit = int(options.get("exit", "0"))
            last_run = block
        elif directive[0] == "skip":
            reason = directive[1].get("reason", "").strip()
            if not reason or set(directive[1]) != {"reason"}:
                raise ValueError(f'{where}: skip needs reason="why it cannot run here" (and nothing else)')
            block.skip = reason
            last_run = None
        else:
            raise ValueError(f"{where}: unknown docs-test directive {directive[0]!r}")
        blocks.append(block)
    return blocks


BLOCKS = [block for path in DOC_FILES for block in collect(path)]


# ------------------------------------------------------------------------------------ output shapes


def ellipsis_json(text: str) -> Any:
    """Parse documented JSON in which a bare ``...`` stands for any value, or for more members/items."""
    out: list[str] = []
    stack: list[str] = []
    i, in_string = 0, False
    while i < len(text):
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\":
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch in "{[":
            stack.append(ch)
            out.append(ch)
        elif ch in "}]":
            stack.pop()
            out.append(ch)
        elif text.startswith("...", i) or text.startswith("…", i):
            before = "".join(out).rstrip()[-1:]
            member = stack and stack[-1] == "{" and before in ("{", ",")
            out.append('"...": "..."' if member else '"..."')
            i += 2 if text.startswith("...", i) else 0
        else:
            out.append(ch)
        i += 1
    return json.loads("".join(out))


def shape_problems(doc: Any, actual: Any, where: str = "$") -> list[str]:
    """How ``actual`` departs from the documented ``doc`` (empty when it fits)."""
    if doc == "...":
        return []
    if isinstance(doc, dict):
        if not isinstance(actual, dict):
            return [f"{where}: documented an object, got {actual!r}"]
        problems = [f"{where}: no {key!r}" for key in doc if key != "..." and key not in actual]
        if "..." not in doc:
            problems += [f"{where}: undocumented {key!r}" for key in actual if key not in doc]
        for key, value in doc.items():
            if key != "..." and key in actual:
                problems += shape_problems(value, actual[key], f"{where}.{key}")
        return problems
    if isinstance(doc, list):
        if not isinstance(actual, list):
            return [f"{where}: documented a list, got {actual!r}"]
        open_ended = bool(doc) and doc[-1] == "..."
        items = doc[:-1] if open_ended else doc
        if len(actual) < len(items) or (not open_ended and len(actual) != len(items)):
            return [f"{where}: documented {len(items)}{'+' if open_ended else ''} items, got {len(actual)}"]
        return [p for k, item in enumerate(items) for p in shape_problems(item, actual[k], f"{where}[{k}]")]
    if doc is None:
        return [] if actual is None else [f"{where}: documented null, got {actual!r}"]
    if isinstance(doc, (bool, str)):
        return [] if actual == doc else [f"{where}: documented {doc!r}, got {actual!r}"]
    if isinstance(doc, (int, float)):
        if isinstance(actual, bool) or not isinstance(actual, (int, float)):
            return [f"{where}: documented a number, got {actual!r}"]
        return [f"{where}: documented a non-negative number, got {actual!r}"] if doc >= 0 > actual else []
    raise AssertionError(f"{where}: cannot read the documented {doc!r}")


def first_json(stdout: str) -> Any:
    """The first JSON object or array that starts a line of ``stdout``."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^[{\[]", stdout, re.M):
        try:
            return decoder.raw_decode(stdout[match.start():])[0]
        except ValueError:
            continue
    raise AssertionError(f"no JSON document in the output:\n{stdout}")


def text_problems(doc: str, actual: str) -> list[str]:
    lines = [line.rstrip() for line in actual.splitlines()]
    at = 0
    for wanted in (line.rstrip() for line in doc.splitlines()):
        if not wanted.strip():
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in re.split(r"\.\.\.|…", wanted)))
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        if at == len(lines):
            return [f"no line (in order) like {wanted!r}"]
        at += 1
    return []


# ------------------------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def double_url():
    from gpubridge.testing import ComfyDouble

    with ComfyDouble().run_in_thread() as comfy:
        yield comfy.url


def _workdir(tmp_path: Path) -> Path:
    """A fresh folder that sees the repository's files (its own out/, no gpubridge.toml)."""
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv", ".venv-fuzz", "out", "gpubridge.toml") and entry.is_dir():
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def run_block(block: Block, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = block.code.replace(f"http://{DOCS_DOUBLE}", url)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPUBRIDGE_", "RUNPOD_", "MODAL_", "COMFY_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        GPUBRIDGE_COMFY_URL=url,
        COMFY_URL=url,
        COLUMNS="80",  # what a terminal gives by default; tables must fit it
        NO_COLOR="1",
        PYTHONUNBUFFERED="1",
    )
    if block.lang in PYTHON:
        (cwd / "docs_block.py").write_text(code)
        argv = [sys.executable, "docs_block.py"]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", code]
    # One stream, as a terminal shows it (both unbuffered, so in the order written). The block runs in a
    # session of its own, ended as a whole afterwards: nothing it started (a server, a `&` job) outlives it.
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return subprocess.CompletedProcess(argv, -9, f"{out}\n(killed after {BLOCK_TIMEOUT} s)")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, out)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_docs_block(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(f"not runnable here: {block.skip}")
    url = request.getfixturevalue("double_url")
    done = run_block(block, url, _workdir(tmp_path))
    shown = f"--- output\n{done.stdout[-6000:]}"
    assert done.returncode == block.exit, f"{block.id} exited {done.returncode}, not {block.exit}\n{shown}"
    for kind, documented in block.outputs:
        if kind == "json":
            problems = shape_problems(ellipsis_json(documented), first_json(done.stdout))
        else:
            problems = text_problems(documented, done.stdout)
        assert not problems, f"{block.id}: the output is not what the docs show: {problems}\n{shown}"


# ------------------------------------------------------------------------------------ the collector


def test_every_doc_has_checked_blocks() -> None:
    """The collector sees the blocks (a parser change cannot make the docs test pass by finding none)."""
    per_file = {path: [b for b in BLOCKS if b.path == path] for path in DOC_FILES}
    assert all(per_file.values()), [str(p) for p, blocks in per_file.items() if not blocks]
    assert sum(1 for b in BLOCKS if not b.skip) >= 8


@pytest.mark.parametrize("comment, problem", [
    ('<!-- docs-test: skip -->', "skip needs reason"),
    ('<!-- docs-test: skip reason="" -->', "skip needs reason"),
    ('<!-- docs-test: sikp reason="typo" -->', "unknown docs-test directive"),
    ('<!-- docs-test: run exits=1 -->', "unknown run options"),
    ('<!-- docs-test: options gpubridge run -->', "unknown docs-test directive"),
])
def test_a_bad_comment_fails_the_collection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            comment: str, problem: str) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text(f"text\n\n{comment}\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match=problem):
        collect(doc)


@pytest.mark.parametrize("comment", ['<!-- docs-test: skip reason="x" -->',
                                     "<!-- docs-test: options gpubridge run -->"])
def test_a_comment_before_prose_fails_the_collection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    comment: str) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text(f"{comment}\nSome prose.\n")
    with pytest.raises(ValueError, match="checks nothing"):
        collect(doc)


def test_an_output_block_needs_a_run_block_before_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text('<!-- docs-test: skip reason="x" -->\n```bash\nfalse\n```\n\n'
                   "<!-- docs-test: output text -->\n```text\nok\n```\n")
    with pytest.raises(ValueError, match="run block before it"):
        collect(doc)


def test_shapes() -> None:
    doc = ellipsis_json('{"state": "succeeded", "timings": {"queued_s": null, "total_s": 0.1, ...}, '
                        '"artifacts": [{"width": 256, ...}, ...], ...}')
    good = {"state": "succeeded", "job_id": "x", "timings": {"queued_s": None, "total_s": 2, "x": 1},
            "artifacts": [{"width": 256, "kind": "image"}, {"width": 256}]}
    assert shape_problems(doc, good) == []
    assert shape_problems(doc, {**good, "timings": {"queued_s": -0.5, "total_s": 1}}) == [
        "$.timings.queued_s: documented null, got -0.5"]
    assert shape_problems(doc, {**good, "timings": {"queued_s": None, "total_s": -3.2}}) == [
        "$.timings.total_s: documented a non-negative number, got -3.2"]
    assert shape_problems(doc, {**good, "artifacts": []}) == ["$.artifacts: documented 1+ items, got 0"]
    assert shape_problems({"a": 1}, {"a": 1, "b": 2}) == ["$: undocumented 'b'"]
    assert text_problems("a ... c\nd", "x\na b c\nd\n") == []
    assert text_problems("d\na ... c", "a b c\nd\n") == ["no line (in order) like 'a ... c'"]


# ------------------------------------------------------------------- option tables and the command table
#
# ``<!-- docs-test: options COMMAND -->`` before a Markdown table (first column: the option's names, second:
# its help) checks the table against the options COMMAND is built from, names and help texts alike, so the
# docs and ``--help`` cannot drift apart. ``<!-- docs-test: commands -->`` before README's command table
# checks every ``[--option]`` it lists against the command's options (all of them unless the usage ends
# with ``...``; ``--provider``/``--config``/``--url`` are described once below the table).


def _tables(path: Path) -> list[tuple[tuple[str, dict[str, str]], list[list[Any]]]]:
    """(directive, rows) of each table with a docs-test comment right before it; a row is its cells'
    inline tokens."""
    tokens = MarkdownIt("commonmark").enable("table").parse(path.read_text())
    found = []
    for i, token in enumerate(tokens):
        if token.type != "table_open":
            continue
        directive = _directive(tokens[i - 1] if i else None)
        if directive is None:
            continue
        rows: list[list[Any]] = []
        j = i
        while tokens[j].type != "table_close":
            if tokens[j].type == "tbody_open":
                pass
            if tokens[j].type == "tr_open":
                rows.append([])
            if tokens[j].type == "inline":
                rows[-1].append(tokens[j])
            j += 1
        found.append((directive, rows[1:]))  # without the header row
    return found


def _code_spans(cell: Any) -> list[str]:
    return [child.content for child in cell.children or [] if child.type == "code_inline"]


def _click_command(words: list[str]) -> Any:
    import typer.main

    from gpubridge.cli import app

    command = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]
    return command


def _command_options(words: list[str]) -> dict[str, str]:
    """{option names joined by ", ": help} of ``gpubridge ...`` or ``python -m gpubridge.testing.comfy``."""
    if words == ["python", "-m", "gpubridge.testing.comfy"]:
        from gpubridge.testing.comfy._serve import build_parser

        actions = [a for a in build_parser()._actions if a.dest != "help"]
        return {", ".join(a.option_strings): a.help or "" for a in actions}
    assert words[0] == "gpubridge", words
    params = _click_command(words[1:]).params
    return {", ".join([*p.opts, *p.secondary_opts]): (p.help or "").replace("\\[", "[")
            for p in params if getattr(p, "param_type_name", "") == "option" and p.name != "help"}


SHARED_OPTIONS = {"--provider", "--config", "--url", "--help"}  # described once, below README's table
OPTION_TABLES = [(path, directive, rows) for path in DOC_FILES for directive, rows in _tables(path)
                 if directive[0] == "options"]


@pytest.mark.parametrize("path, directive, rows", OPTION_TABLES,
                         ids=[f"{p.relative_to(ROOT)}:{' '.join(d[1])}" for p, d, _ in OPTION_TABLES])
def test_option_tables_are_the_commands_options(path: Path, directive: Any, rows: list[list[Any]]) -> None:
    documented = {", ".join(_code_spans(row[0])): row[1].content.strip() for row in rows}
    assert documented == _command_options(list(directive[1]))


def test_the_option_tables_exist() -> None:
    assert {" ".join(d[1]) for _, d, _ in OPTION_TABLES} >= {
        "gpubridge run", "gpubridge shadow report", "python -m gpubridge.testing.comfy"}


def test_the_command_table_lists_each_commands_options() -> None:
    tables = [rows for directive, rows in _tables(ROOT / "README.md") if directive[0] == "commands"]
    assert len(tables) == 1
    seen = set()
    for row in tables[0]:
        previous: list[str] = []
        for usage in _code_spans(row[0]):
            words = usage.split()
            names = words[1:] if words[0] == "gpubridge" else [*previous[:-1], words[0]]
            command = _click_command([])
            path: list[str] = []
            for word in names:
                if not hasattr(command, "commands") or word not in command.commands:
                    break
                command = command.commands[word]
                path.append(word)
            previous = path
            seen.add(" ".join(path))
            if hasattr(command, "commands"):
                continue
            listed = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage))
            if path == ["testing", "comfy"]:  # passes its arguments to the double's own parser
                double = _command_options(["python", "-m", "gpubridge.testing.comfy"])
                opt_names = [k.split(", ") for k in double]
            else:
                opt_names = [list(p.opts) for p in command.params if p.param_type_name == "option"]
            actual = {opt for opts in opt_names for opt in opts}
            assert listed <= actual, f"{usage}: not options of the command: {sorted(listed - actual)}"
            if not usage.rstrip().endswith("..."):
                main_names = {opts[0] for opts in opt_names}
                missing = {o for o in main_names if o not in listed} - SHARED_OPTIONS
                assert not missing, f"{usage}: the table leaves out {sorted(missing)}"
    commands = {name for name, c in _click_command([]).commands.items() if not c.hidden}
    assert commands <= {s.split()[0] for s in seen if s}, "a command missing from README's table"


def _settings_blocks(path: Path) -> list[tuple[str, set[str]]]:
    """(MODULE:CLASS, code spans) of each table or paragraph after a ``docs-test: settings`` comment."""
    tokens = MarkdownIt("commonmark").enable("table").parse(path.read_text())
    found = []
    for i, token in enumerate(tokens[:-1]):
        directive = _directive(token)
        if directive is None or directive[0] != "settings":
            continue
        closing = tokens[i + 1].type.replace("_open", "_close")
        spans: set[str] = set()
        j = i + 1
        while tokens[j].type != closing:
            if tokens[j].type == "inline":
                spans.update(_code_spans(tokens[j]))
            j += 1
        found.append((next(iter(directive[1])), spans))
    return found


SETTINGS = [(path, target, spans) for path in DOC_FILES for target, spans in _settings_blocks(path)]


@pytest.mark.parametrize("path, target, spans", SETTINGS, ids=[t for _, t, _ in SETTINGS])
def test_settings_docs_name_every_field(path: Path, target: str, spans: set[str]) -> None:
    """Issue 25, item 9: [providers.modal]'s fields and RunPod's request_timeout were nowhere in the docs."""
    import importlib

    module, _, name = target.partition(":")
    fields = set(getattr(importlib.import_module(module), name).model_fields)
    named = {part.strip() for span in spans for part in span.split(",")}
    assert fields <= named, f"{path.relative_to(ROOT)} leaves out {sorted(fields - named)} of {target}"
    assert len(SETTINGS) >= 2
