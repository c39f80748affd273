"""Sphinx directives that put numbers into the pages from where they live, so that the
documentation never retypes one:

- ``results-table``: a Markdown table of a committed benchmark result file
  (``benchmarks/results/...``), chosen by the heading it follows, optionally with a subset
  of its columns and rows;
- ``options-table``: the options an optimizer or solver declares (names, defaults and
  what each accepts, from :func:`hpcqn.options.declared`), with a meaning per option
  given in the directive's body (a name the class does not declare is an error);
- ``job-schema``: every section and key a job file of the given file's kind may hold,
  with defaults and accepted values, from :func:`hpcqn.experiments.jobs.schema` (the
  declarations ``hpcqn run`` checks job files against).

In a MyST page::

    ```{results-table} benchmarks/results/bench_minimize.txt
    :heading: hpcqn.minimize vs SciPy L-BFGS-B
    :columns: n, solver, ranks, nit, seconds (median), time / SciPy
    ```

    ```{options-table} hpcqn.optimizers.lbfgs.LBFGSOptions
    gtol: stop when max |g_i| <= gtol
    ```
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[2]


class ResultsError(ValueError):
    """A result file, heading, table, column or row that is not there."""


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row (``|`` inside backticks or escaped kept)."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    cells, current, in_code = [], [], False
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            current.append("\\|")
            i += 2
            continue
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    cells.append("".join(current).strip())
    return cells


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def tables_after(text: str, heading: str | None) -> list[list[str]]:
    """The Markdown tables (each a list of its lines) of ``text`` that follow the first
    heading line (``#`` ...) containing ``heading`` and come before the next heading of
    the same or a higher level; the whole text when ``heading`` is None."""
    lines = text.splitlines()
    start, level = 0, 0
    if heading is not None:
        for i, line in enumerate(lines):
            match = re.match(r"(#+)\s", line)
            if match and heading in line:
                start, level = i + 1, len(match.group(1))
                break
        else:
            raise ResultsError(f"no heading containing {heading!r}")
    tables: list[list[str]] = []
    current: list[str] = []
    for line in lines[start:]:
        match = re.match(r"(#+)\s", line)
        if match and level and len(match.group(1)) <= level:
            break
        if line.lstrip().startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def heading_line(text: str, heading: str | None) -> str:
    """The text of the heading line containing ``heading`` (without its ``#``)."""
    for line in text.splitlines():
        if re.match(r"#+\s", line) and heading is not None and heading in line:
            return line.lstrip("#").strip()
    raise ResultsError(f"no heading containing {heading!r}")


def machine_line(text: str) -> str:
    """The line that names the machine a result was measured on (``Machine: ...``)."""
    for line in text.splitlines():
        if re.match(r"\**Machine\**:", line):
            return line.strip()
    raise ResultsError("no 'Machine:' line")


def select(table: list[str], columns: list[str] | None, rows: str | None) -> list[str]:
    """``table`` with only ``columns`` (header names, in the given order) and the body
    rows whose cells joined by ``" | "`` match the regular expression ``rows``."""
    header, rule, body = _cells(table[0]), _cells(table[1]), [_cells(r) for r in table[2:]]
    if columns is not None:
        missing = [c for c in columns if c not in header]
        if missing:
            raise ResultsError(f"no column(s) {missing}; the table has {header}")
        keep = [header.index(c) for c in columns]
    else:
        keep = list(range(len(header)))
    if rows is not None:
        pattern = re.compile(rows)
        body = [r for r in body if pattern.search(" | ".join(r))]
        if not body:
            raise ResultsError(f"no row matches {rows!r}")
    return [_row([cells[k] for k in keep]) for cells in (header, rule, *body)]


class ResultsTable(SphinxDirective):
    """A table of a committed result file, with a line naming the file."""

    required_arguments = 1
    option_spec = {
        "heading": directives.unchanged,
        "table": directives.positive_int,
        "columns": directives.unchanged,
        "rows": directives.unchanged,
        "machine": directives.flag,
        "with-heading": directives.flag,
    }

    def run(self) -> list[nodes.Node]:
        relative = self.arguments[0]
        path = ROOT / relative
        if not path.is_file():
            raise self.error(f"results-table: no file {relative}")
        self.env.note_dependency(str(path))
        columns = self.options.get("columns")
        try:
            text = path.read_text()
            tables = tables_after(text, self.options.get("heading"))
            index = self.options.get("table", 1)
            if len(tables) < index:
                raise ResultsError(f"table {index} asked for, {len(tables)} found")
            lines = select(tables[index - 1],
                           None if columns is None else [c.strip() for c in columns.split(",")],
                           self.options.get("rows"))
            before = []
            if "with-heading" in self.options:
                before += [heading_line(text, self.options.get("heading")), ""]
            if "machine" in self.options:
                before += [machine_line(text), ""]
        except ResultsError as exc:
            raise self.error(f"results-table {relative}: {exc}") from None
        lines = [*before, *lines, "", f"From `{relative}`, committed with the code that "
                 f"produced it."]
        container = nodes.container(classes=["hpcqn-results"])
        self.state.nested_parse(StringList(lines, source=str(path)), self.content_offset,
                                container)
        return [container]


def _load(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _shown(value: Any) -> str:
    if isinstance(value, type):  # a dtype given as its NumPy type: written by name
        value = value.__name__
    if isinstance(value, str):
        return f'`"{value}"`'
    if value is None:
        return "`None`"
    return f"`{value!r}`"


class OptionsTable(SphinxDirective):
    """The options a class declares (:func:`hpcqn.options.declared`): name, default,
    accepted values, and the meaning given in the body as ``name: text`` lines."""

    required_arguments = 1
    has_content = True
    option_spec = {"exclude": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        from hpcqn import options

        try:
            spec = options.declared(_load(self.arguments[0]))
        except (ImportError, AttributeError) as exc:
            raise self.error(f"options-table: cannot load {self.arguments[0]}: {exc}") from None
        excluded = {n.strip() for n in self.options.get("exclude", "").split(",") if n.strip()}
        meanings: dict[str, str] = {}
        for line in self.content:
            if not line.strip():
                continue
            name, sep, text = line.partition(":")
            if not sep:
                raise self.error(f"options-table: a line must be 'name: meaning', got {line!r}")
            meanings[name.strip()] = text.strip()
        unknown = sorted(set(meanings) - set(spec))
        if unknown:
            raise self.error(f"options-table: {self.arguments[0]} declares no option(s) "
                             f"{unknown}")
        rows = ["| option | default | accepts | meaning |", "|---|---|---|---|"]
        for name, option in spec.items():
            if name in excluded:
                continue
            rule = option.rule.describe().replace("|", "\\|") if option.rule else ""
            meaning = meanings.get(name, "").replace("|", "\\|")
            rows.append(_row([f"`{name}`", _shown(option.default), rule, meaning]))
        container = nodes.container(classes=["hpcqn-options"])
        self.state.nested_parse(StringList(rows), self.content_offset, container)
        return [container]


class JobSchema(SphinxDirective):
    """The sections and keys a job file like the one named may hold (its kind, problem
    and methods decide them), one table per section."""

    required_arguments = 1
    option_spec = {"sections": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        from hpcqn.experiments.jobs import schema, tomllib

        relative = self.arguments[0]
        path = ROOT / relative
        if not path.is_file():
            raise self.error(f"job-schema: no file {relative}")
        self.env.note_dependency(str(path))
        sections = schema(tomllib.loads(path.read_text()), relative)
        wanted = self.options.get("sections")
        names = list(sections) if wanted is None else [n.strip() for n in wanted.split(",")]
        rows: list[str] = []
        for name in names:
            if name not in sections:
                raise self.error(f"job-schema {relative}: no section [{name}]; it has "
                                 f"{list(sections)}")
            rows += [f"`[{name}]`", "", "| key | default | accepts |", "|---|---|---|"]
            for key, option in sections[name].items():
                rule = option.rule.describe().replace("|", "\\|") if option.rule else ""
                default = _shown(option.default)
                if option.default is None and not (option.rule and option.rule.none):
                    default = "(the file's name)" if (name, key) == ("job", "name") \
                        else "(required)"
                rows.append(_row([f"`{key}`", default, rule]))
            rows.append("")
        container = nodes.container(classes=["hpcqn-options"])
        self.state.nested_parse(StringList(rows), self.content_offset, container)
        return [container]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("results-table", ResultsTable)
    app.add_directive("options-table", OptionsTable)
    app.add_directive("job-schema", JobSchema)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
