"""A griffe extension for the documentation site: convmat's docstrings as mkdocstrings renders them.

convmat's docstrings are Google style with two habits Markdown does not read: a doctest at the
top level of the docstring (``>>> ...`` lines, not under an ``Examples:`` heading), which Markdown
would read as nested quotes, and Sphinx roles (``:func:`~convmat.symbolic```). This extension,
run by mkdocstrings (``mkdocs.yml``), rewrites them when the package is loaded:

- a top-level doctest (from its ``>>>`` line to the next blank line) becomes a ``pycon`` code
  block;
- a role naming a convmat object becomes a cross-reference (a link where the site documents
  that object, its name in code otherwise); one naming an object of another importable package
  (``torch.nn.Conv2d``) stays code; one naming nothing that exists is a warning, which fails the
  strict build: a reference left behind by a rename is caught here.
"""

from __future__ import annotations

import html
import importlib
import logging
import re
from typing import Any

import griffe

#: Warnings under the ``mkdocs`` logger count in ``mkdocs build --strict``.
_LOG = logging.getLogger("mkdocs.plugins.convmat.docstrings")

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|exc|obj|const):`(~?)([\w.]+)`")


def _member(obj: Any, name: str) -> Any:
    """``obj``'s member ``name`` (an alias resolved to what it names), or None."""
    try:
        if obj.is_alias:
            obj = obj.final_target
        member = obj.all_members.get(name)
        if member is not None and member.is_alias:
            member = member.final_target
        return member
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _walk(start: Any, dotted: str) -> Any:
    found = start
    for name in dotted.split("."):
        found = _member(found, name)
        if found is None:
            return None
    return found


def _resolve(obj: Any, root: Any, dotted: str) -> Any:
    """What ``dotted`` names, read as Python would from inside ``obj``: ``obj``'s own members,
    then those of each scope around it, then from the package down (``convmat.x.y``)."""
    scope = obj
    while scope is not None:
        found = _walk(scope, dotted)
        if found is not None:
            return found
        scope = scope.parent
    head, _, rest = dotted.partition(".")
    if head == root.name:
        return root if not rest else _walk(root, rest)
    return None


def _exists(dotted: str, obj: Any) -> bool:
    """Whether ``dotted`` names something at run time that griffe's reading of the source does
    not show: a builtin (``IndexError``), a name of ``obj``'s module assigned in a way griffe does
    not follow (``A, B = 1, 2``), an object of another package (``torch.nn.Conv2d``)."""
    module = obj if obj.is_module else obj.module
    for prefix in (module.path, "builtins"):
        try:
            found: Any = importlib.import_module(prefix)
            for name in dotted.split("."):
                found = getattr(found, name)
            return True
        except (ImportError, AttributeError):
            continue
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                found = getattr(found, name)
        except AttributeError:
            return False
        return True
    return False


def _roles(text: str, obj: Any, root: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        short, dotted = match.group(1), match.group(2)
        shown = html.escape(dotted.rsplit(".", 1)[-1] if short else dotted)
        target = _resolve(obj, root, dotted)
        if target is not None:
            return f'<autoref identifier="{target.path}" optional><code>{shown}</code></autoref>'
        if not _exists(dotted, obj):
            _LOG.warning(f"{obj.path}: the docstring names {match.group(0)}, which does not exist")
        return f"<code>{shown}</code>"

    return _ROLE.sub(replace, text)


def _fenced_doctests(text: str) -> str:
    """Each top-level doctest (a ``>>>`` line to the next blank line) as a ``pycon`` block."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        if out and out[-1].strip():
            out.append("")
        out.append('```pycon title="Example"')
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append("```")
    return "\n".join(out)


_SECTION = re.compile(r"^(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_GROUP = re.compile(r"^([\w*]+(?:\s*,\s*[\w*]+)+)\s*,?\s*:\s*(.*)$")


def _split_grouped_args(text: str) -> str:
    """``a, b, c: what they are`` in an ``Args:`` section (the names may wrap onto the next line)
    as one entry per name, each with the description, as the Google style griffe reads has it."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        if not _SECTION.match(lines[i]):
            i += 1
            continue
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
            if not lines[i].strip():
                out.append(lines[i])
                i += 1
                continue
            indent = len(lines[i]) - len(lines[i].lstrip())
            end = i + 1
            while (
                end < len(lines)
                and lines[end].strip()
                and (len(lines[end]) - len(lines[end].lstrip()) > indent)
            ):
                end += 1
            item = lines[i:end]
            match = None
            for joined in range(1, len(item) + 1):
                match = _GROUP.match(" ".join(line.strip() for line in item[:joined]))
                if match or ":" in item[joined - 1]:
                    break
            if match:
                rest = item[joined:]
                for name in re.split(r"\s*,\s*", match.group(1)):
                    out.append(f"{' ' * indent}{name}: {match.group(2)}")
                    out.extend(rest)
            else:
                out.extend(item)
            i = end
    return "\n".join(out)


class Docstrings(griffe.Extension):
    """Rewrites every docstring of a loaded package (see the module's docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: Any, **kwargs: Any) -> None:
        stack: list[Any] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:
                text = _split_grouped_args(_fenced_doctests(obj.docstring.value))
                # Roles are rewritten outside code blocks only (the odd parts of a split on fences).
                parts = re.split(r"(^```.*?^```)", text, flags=re.MULTILINE | re.DOTALL)
                obj.docstring.value = "".join(
                    part if k % 2 else _roles(part, obj, pkg) for k, part in enumerate(parts)
                )
            stack.extend(m for m in obj.members.values() if not m.is_alias)
