"""MkDocs hooks (``mkdocs.yml``): the parts of the site generated from the repository at build time.

A page asks for a generated part with a comment of its own line, ``<!-- generated: NAME -->``:

- ``README intro``, ``README setup``, ``README test-command``, ``README section "TITLE"``: the
  README's first paragraph, its first command, the command under its ``<!-- test-command -->``
  marker (the one CI runs, read as ``.ci/run`` reads it) and the body of one of its ``##``
  sections, so the home page has no copy of them to keep in sync;
- ``API index``: every public name of ``convmat`` and ``convmat.nn`` with the first line of its
  docstring, each a cross-reference, so a name the API pages do not document fails the build;
- ``command reference``: every subcommand and option of ``convmat``, read from its argparse
  parser (``convmat.presentation.cli``);
- ``include PATH``: a Markdown file of the repository (``benchmarks/README.md``), included as
  it is, except that a table right under a paragraph line gets the blank line Python-Markdown
  needs (GitHub's Markdown does not, and the file is written for GitHub);
- ``explorer``: the explorer page, written by ``convmat.presentation.explore`` into the site as
  ``explorer.html`` (no stored copy), in a frame.

An unknown name, or a README part that is not found, stops the build.
"""

from __future__ import annotations

import argparse
import html
import inspect
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
EXPLORER = "explorer.html"

_DIRECTIVE = re.compile(r"^<!-- generated: (.+?) -->[ \t]*$", re.MULTILINE)
_FENCE = re.compile(r"^```")
_ROLE = re.compile(r":(?:py:)?\w+:`~?([\w.]+)`")


# -- README parts ----------------------------------------------------------------------------


def _readme() -> list[str]:
    return (ROOT / "README.md").read_text(encoding="utf-8").splitlines()


def _block_from(lines: list[str], start: int) -> str:
    """The fenced block opening at or after line ``start``, fences included."""
    first = next((i for i in range(start, len(lines)) if _FENCE.match(lines[i])), None)
    if first is None:
        raise PluginError("README.md: no fenced block where one was expected")
    end = next((i for i in range(first + 1, len(lines)) if _FENCE.match(lines[i])), None)
    if end is None:
        raise PluginError("README.md: a fenced block is not closed")
    return "\n".join(lines[first : end + 1])


def readme_part(name: str) -> str:
    """One part of README.md (see the module's docstring), as Markdown for a page in docs/."""
    lines = _readme()
    if name == "intro":
        start = next(i for i, line in enumerate(lines) if line.startswith("# ")) + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
        return "\n".join(lines[start:end])
    if name == "setup":
        return _block_from(lines, 0)
    if name == "test-command":
        marker = next((i for i, line in enumerate(lines) if "<!-- test-command -->" in line), None)
        if marker is None:
            raise PluginError("README.md has no <!-- test-command --> marker")
        return _block_from(lines, marker + 1)
    section = re.fullmatch(r'section "(.+)"', name)
    if section:
        title = f"## {section.group(1)}"
        if title not in lines:
            raise PluginError(f"README.md has no section {title!r}")
        start = lines.index(title) + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
        body = "\n".join(lines[start:end]).strip("\n")
        # Links in README are relative to the repository's root; pages are under docs/.
        return re.sub(r"\]\(docs/", "](", body)
    raise PluginError(f"unknown README part {name!r}")


# -- included files --------------------------------------------------------------------------


def include(path: str) -> str:
    """The repository's Markdown file ``path``, tables separated from the paragraph above."""
    source = (ROOT / path).resolve()
    if ROOT not in source.parents or not source.is_file():
        raise PluginError(f"include: no file {path!r} in the repository")
    lines = source.read_text(encoding="utf-8").splitlines()
    out: list[str] = []
    fenced = False
    for i, line in enumerate(lines):
        fenced ^= bool(_FENCE.match(line))
        opens_table = (
            not fenced
            and line.startswith("|")
            and i + 1 < len(lines)
            and re.match(r"^\|[-| :]+\|$", lines[i + 1])
        )
        if opens_table and out and out[-1].strip() and not out[-1].startswith("|"):
            out.append("")
        out.append(line)
    return "\n".join(out)


# -- the API index ---------------------------------------------------------------------------


def _summary(obj: Any) -> str:
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return f"`{obj!r}`"
    doc = inspect.getdoc(obj) or ""
    first = doc.split("\n\n", 1)[0].replace("\n", " ")
    return _ROLE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", first).replace("|", r"\|")


def public_names() -> list[str]:
    """Every public name, as its full path: ``convmat.X`` for ``convmat.__all__``, then
    ``convmat.nn.X`` for ``convmat.nn.__all__``."""
    import convmat
    import convmat.nn

    return [f"convmat.{n}" for n in convmat.__all__] + [
        f"convmat.nn.{n}" for n in convmat.nn.__all__
    ]


def api_index() -> str:
    import importlib

    rows = ['<div class="convmat-names" markdown>', "", "| name | what it is |", "|---|---|"]
    for path in public_names():
        module, _, name = path.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        rows.append(f"| [`{path}`][{path}] | {_summary(obj)} |")
    return "\n".join([*rows, "", "</div>"])


# -- the command's reference -----------------------------------------------------------------


def _cell(text: str) -> str:
    return html.escape(" ".join(text.split())).replace("|", "&#124;").replace("_", r"\_")


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ['<div class="convmat-names" markdown>', "", "| option | value | what it sets |",
            "|---|---|---|"]  # fmt: skip
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        if action.nargs == 0:
            value = ""
        elif action.choices is not None:
            value = " \\| ".join(f"`{c}`" for c in action.choices)
        else:
            metavar = action.metavar or (action.dest.upper() if action.option_strings else "")
            value = f"`{metavar}`" if metavar else ""
        what = _cell(action.help or "")
        if action.required and action.option_strings:
            what = f"**required.** {what}"
        rows.append(f"| {names} | {value} | {what} |")
    return [*rows, "", "</div>"]


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def command_reference() -> str:
    """The reference of every subcommand and option, from the command's own parser."""
    from convmat.presentation.cli import _parser

    parser = _parser()
    width = 76  # the usage fits the page's column
    out = [
        _cell(parser.description or ""),
        "",
        "```text",
        parser.format_usage().strip(),
        "```",
        "",
        *_option_rows(parser),
        "",
        _cell(parser.epilog or ""),
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    subcommands = _subcommands(parser)
    out += [f"| [`convmat {name}`](#convmat-{name}) | {_cell(text)} |"
            for name, text, _ in subcommands]  # fmt: skip
    for name, _, sub in subcommands:
        sub.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=width)
        out += [
            "",
            f"## `convmat {name}` {{#convmat-{name}}}",
            "",
            _cell(sub.description or ""),
            "",
            "```text",
            sub.format_usage().strip(),
            "```",
            "",
            *_option_rows(sub),
        ]
    return "\n".join(out)


# -- the explorer ----------------------------------------------------------------------------


def _explorer_frame(page: Any, files: Files) -> str:
    target = files.get_file_from_path(EXPLORER)
    if target is None:
        raise PluginError(f"{EXPLORER} was not generated")
    url = target.url_relative_to(page.file)
    return (
        f'<p><a href="{url}" target="_blank">Open the explorer on its own page</a> (one '
        f"self-contained file: save it to use it offline; its URL keeps the settings).</p>\n"
        f'<iframe class="convmat-explorer" src="{url}" title="convmat explore" '
        f'style="width: 100%; height: 1100px; border: 1px solid #ccc;"></iframe>\n'
        # Served over http the frame takes the page's height; from file:// it keeps 1100px.
        "<script>\n"
        'document.querySelectorAll("iframe.convmat-explorer").forEach(function (f) {\n'
        "  function fit() {\n"
        "    try {\n"
        "      var b = f.contentDocument.body, s = getComputedStyle(b);\n"
        "      var h = b.getBoundingClientRect().height + parseFloat(s.marginTop)\n"
        "        + parseFloat(s.marginBottom) + 8;\n"
        '      f.style.height = Math.ceil(h) + "px";\n'
        "    } catch (e) {}\n"
        "  }\n"
        '  f.addEventListener("load", function () {\n'
        "    fit();\n"
        "    try { new ResizeObserver(fit).observe(f.contentDocument.body); } catch (e) {}\n"
        "  });\n"
        "});\n"
        "</script>"
    )


# -- the hooks -------------------------------------------------------------------------------


def on_files(files: Files, config: Any) -> Files:
    from convmat.presentation.explore import page_html

    files.append(File.generated(config, EXPLORER, content=page_html()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("README "):
            return readme_part(name[len("README ") :])
        if name.startswith("include "):
            return include(name[len("include ") :])
        if name == "API index":
            return api_index()
        if name == "command reference":
            return command_reference()
        if name == "explorer":
            return _explorer_frame(page, files)
        raise PluginError(f"{page.file.src_path}: unknown generated part {name!r}")

    return _DIRECTIVE.sub(replace, markdown)
