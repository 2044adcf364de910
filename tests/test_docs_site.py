"""The documentation site: ``mkdocs build --strict`` (a broken link, cross-reference or docstring
fails it), then the built pages against their sources: an API entry for every public name with
its signature, ``Shape:`` note and example, the README's two commands on the home page, every
subcommand and option of the command's parser, the notebook's cells, the benchmark tables, the
explorer page as ``convmat.presentation.explore`` writes it; and the site in headless Chromium
(Debian's chromium and chromedriver), served over HTTP as ``mkdocs serve`` serves it."""

from __future__ import annotations

import argparse
import html
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import griffe
import pytest

import convmat
import convmat.nn
from convmat.presentation.cli import _parser
from convmat.presentation.explore import page_html

ROOT = Path(__file__).resolve().parent.parent


def _public() -> list[tuple[str, object]]:
    return [(f"convmat.{n}", getattr(convmat, n)) for n in convmat.__all__] + [
        (f"convmat.nn.{n}", getattr(convmat.nn, n)) for n in convmat.nn.__all__
    ]


def _text(page: str) -> str:
    """A page's visible text, tags removed and entities decoded, whitespace as single spaces."""
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site as ``mkdocs build --strict`` writes it, and how long that took."""
    out = tmp_path_factory.mktemp("site")
    before = _tree()
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert _tree() == before, "the build wrote into the repository"
    return out, seconds


def _tree() -> set[str]:
    """The names at the top of the repository and under docs/ (where a build could write)."""
    return {str(p.relative_to(ROOT)) for p in (*ROOT.iterdir(), *(ROOT / "docs").rglob("*"))}


def _page(site, path: str) -> str:
    return (site[0] / path).read_text(encoding="utf-8")


def test_build_is_strict(site):
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^strict: true$", config, re.MULTILINE)
    for name in ("validation", "omitted_files: warn", "unrecognized_links: warn", "anchors: warn"):
        assert name in config
    print(f"mkdocs build --strict: {site[1]:.1f} s")


# ---- the API reference -------------------------------------------------------------------------


def _api_entries(site) -> dict[str, str]:
    """Each documented object's HTML, from its heading to the next object of its level."""
    entries = {}
    for page in sorted((site[0] / "api").glob("*/index.html")):
        text = page.read_text(encoding="utf-8")
        heads = list(re.finditer(r'<h2 id="([\w.]+)" class="doc doc-heading', text))
        for head, after in zip(heads, [*heads[1:], None], strict=True):
            entries[head.group(1)] = text[head.start() : after.start() if after else len(text)]
    return entries


def test_every_public_name_has_its_api_entry(site):
    entries = _api_entries(site)
    # convmat.nn.spectral_norm is convmat.spectral_norm; its page says so and links there.
    nn_page = _page(site, "api/nn/index.html")
    assert 'id="convmat.nn.spectral_norm"' in nn_page and "#convmat.spectral_norm" in nn_page
    assert convmat.nn.spectral_norm is convmat.spectral_norm
    missing = [path for path, _ in _public()
               if path not in entries and path != "convmat.nn.spectral_norm"]  # fmt: skip
    assert not missing, f"public names with no entry in docs/api/*.md: {missing}"


def test_api_entries_show_signature_shape_and_example(site):
    entries = _api_entries(site)
    checked = {"signature": 0, "shape": 0, "example": 0}
    for path, obj in _public():
        if path not in entries:
            continue
        entry = entries[path]
        if inspect.isroutine(obj) or (inspect.isclass(obj) and "__init__" in vars(obj)):
            assert "doc-signature" in entry, path
            checked["signature"] += 1
        doc = inspect.getdoc(obj) if inspect.isroutine(obj) or inspect.isclass(obj) else None
        if doc and re.search(r"^Shape:$", doc, re.MULTILINE):
            assert re.search(r'class="(admonition )?shape"[^>]*>\s*<summary>Shape<', entry), path
            checked["shape"] += 1
        if doc and re.search(r"^>>> ", doc, re.MULTILINE):
            # The top-level doctest as a Python session, not as nested quotes.
            assert '<span class="filename">Example</span>' in entry, path
            assert '<span class="gp">&gt;&gt;&gt; </span>' in entry, path  # as pycon
            assert "<blockquote>" not in entry, path
            first = next(line for line in doc.splitlines() if line.startswith(">>> "))
            assert first[4:].split("(")[0].strip() in _text(entry), (path, first)
            checked["example"] += 1
        # Sphinx roles are rendered as code or links, never as raw text.
        assert not re.search(r":(func|class|mod|meth|attr|data):`", _text(entry)), path
    assert min(checked.values()) >= 10, checked


def test_api_index_links_every_public_name(site):
    index = _page(site, "api/index.html")
    for path, _ in _public():
        anchor = re.search(rf'<a [^>]*href="([^"]*#{re.escape(path)})"', index)
        assert anchor, path
        target, _, fragment = anchor.group(1).partition("#")
        page = (site[0] / "api" / target / "index.html").resolve()
        assert f'id="{fragment}"' in page.read_text(encoding="utf-8"), path


# ---- pages generated from the repository ----------------------------------------------------


def _readme_block_after(lines: list[str], start: int) -> str:
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    end = next(i for i in range(first + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[first + 1 : end])


def test_home_page_shows_the_readme_commands(site):
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    setup = _readme_block_after(lines, 0)
    marker = next(i for i, line in enumerate(lines) if line.strip() == "<!-- test-command -->")
    test_command = _readme_block_after(lines, marker + 1)
    # The command CI runs, read as .ci/run reads it.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in ci
    home = _text(_page(site, "index.html"))
    for command in (setup, test_command):
        assert " ".join(command.split()) in home, command


def test_command_reference_lists_every_subcommand_and_option(site):
    page = _page(site, "cli/index.html")
    text = _text(page)
    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(subs.choices) >= 7
    for name, sub in subs.choices.items():
        assert f'id="convmat-{name}"' in page, name
        section = text.split(f"convmat {name} ", 1)[1]
        assert (sub.description or "").split(".")[0] in text, name
        for action in sub._actions:
            for option in action.option_strings:
                assert option in section, (name, option)
            if action.help and action.help != argparse.SUPPRESS:
                assert " ".join(action.help.split()) in section, (name, action.help)
            for choice in action.choices or ():
                assert choice in section, (name, choice)
    assert " ".join((parser.epilog or "").split()) in text


def test_explorer_page_is_written_by_the_explorer_module(site):
    assert _page(site, "explorer.html") == page_html()
    page = _page(site, "explorer/index.html")
    frames = re.findall(r'<iframe class="convmat-explorer" src="([^"]+)"', page)
    assert frames == ["../explorer.html"]
    assert (site[0] / "explorer" / frames[0]).resolve() == (site[0] / "explorer.html").resolve()


def test_tour_page_renders_the_stored_notebook(site):
    notebook = json.loads((ROOT / "docs" / "tour.ipynb").read_text(encoding="utf-8"))
    page = _page(site, "tour/index.html")
    text = _text(page)
    pictures = {"png": 0, "gif": 0}
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            for title in re.findall(r"^#+ (.+)$", source, re.MULTILINE):
                assert title.replace("`", "") in text, title
        else:
            first = next(line for line in source.splitlines() if line.strip())
            assert " ".join(first.split()) in text, first
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                richer = {"text/html", "image/svg+xml", "text/markdown", "text/latex"} & set(data)
                pictures["png"] += "image/png" in data and not richer  # nbconvert's choice
                pictures["gif"] += "".join(data.get("text/html", "")).count("data:image/gif")
    # As stored: no kernel runs in the build, so the page has exactly the notebook's pictures.
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64', page)) == pictures["png"]
    assert page.count("data:image/gif") == pictures["gif"]


def _markdown_tables(text: str) -> int:
    return len(re.findall(r"^\|.*\|\n\|[-| :]+\|$", text, re.MULTILINE))


def test_architecture_and_benchmarks_pages_include_their_sources(site):
    for source, built in (
        ("benchmarks/README.md", "benchmarks/index.html"),
        ("docs/ARCHITECTURE.md", "ARCHITECTURE/index.html"),
    ):
        markdown = (ROOT / source).read_text(encoding="utf-8")
        page = _page(site, built)
        text = _text(page)
        for title in re.findall(r"^#{1,3} (.+)$", markdown, re.MULTILINE):
            assert " ".join(title.replace("`", "").split()) in text, (source, title)
        assert page.count("<table>") == _markdown_tables(markdown) > 0, source


# ---- the docstring extension ----------------------------------------------------------------


def _extension():
    spec = importlib.util.spec_from_file_location("griffe_docstrings",
                                                  ROOT / "tools" / "griffe_docstrings.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_extension_rewrites_doctests_roles_and_grouped_args(caplog):
    ext = _extension()
    text = "Intro.\n>>> f(1)\n2\n\nAfter.\n\n```python\n>>> kept\n```"
    assert ext._fenced_doctests(text) == (
        'Intro.\n\n```pycon title="Example"\n>>> f(1)\n2\n```\n\nAfter.\n\n```python\n>>> kept\n```'
    )
    grouped = "Args:\n    a, b,\n        c: shared,\n        more.\n    d: own.\n\nShape:\n    x"
    assert ext._split_grouped_args(grouped) == (
        "Args:\n    a: shared,\n        more.\n    b: shared,\n        more.\n"
        "    c: shared,\n        more.\n    d: own.\n\nShape:\n    x"
    )
    pkg = griffe.load("convmat", search_paths=[str(ROOT)])
    fn = pkg["matrix.conv_transpose_matrix"]
    out = ext._roles(
        ":func:`conv_matrix`, :class:`~convmat.engine.Geometry`, :class:`torch.nn.Conv2d`, "
        ":class:`IndexError`",
        fn,
        pkg,
    )
    assert out == (
        '<autoref identifier="convmat.matrix.conv_matrix" optional><code>conv_matrix</code>'
        '</autoref>, <autoref identifier="convmat.engine.shapes.Geometry" optional><code>'
        "Geometry</code></autoref>, <code>torch.nn.Conv2d</code>, <code>IndexError</code>"
    )
    assert not caplog.records
    with caplog.at_level("WARNING"):
        ext._roles(":func:`conv_matrixx`", fn, pkg)
    assert [r.name for r in caplog.records] == ["mkdocs.plugins.convmat.docstrings"]
    assert "conv_matrixx" in caplog.records[0].getMessage()


# ---- the site in a real browser -------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP on a free local port (as ``mkdocs serve`` gives it)."""
    handler = partial(_QuietHandler, directory=str(site[0]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def browser():
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                   if shutil.which(n)), None)  # fmt: skip
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("no chromium or chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="convmat-docs-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--window-size=1400,1000",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


PAGES = ("", "tour/", "explorer/", "api/", "api/matrices/", "api/nn/", "cli/", "ARCHITECTURE/",
         "benchmarks/")  # fmt: skip


def test_pages_load_in_chromium_without_errors(served, browser):
    for path in PAGES:
        browser.get(served + path)
        assert browser.execute_script("return document.readyState") == "complete"
        title = browser.execute_script("return document.querySelector('h1').textContent")
        assert title.strip(), path
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, (path, errors)


def test_explorer_runs_inside_the_site(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served + "explorer/")
    frame = browser.find_element(By.CSS_SELECTOR, "iframe.convmat-explorer")
    browser.switch_to.frame(frame)
    try:
        WebDriverWait(browser, 20).until(
            lambda d: d.find_element(By.ID, "torch-line").text.startswith("nn.Conv")
        )
        # The frame takes the explorer's height (same origin over HTTP): its view holds the
        # whole page, with no scroll bar inside the site's page, and not much more.
        measure = (
            "var b = document.body, s = getComputedStyle(b);"
            "return [document.documentElement.clientHeight,"
            " b.getBoundingClientRect().bottom + parseFloat(s.marginBottom)];"
        )
        WebDriverWait(browser, 20).until(
            lambda d: 0 <= (lambda v: v[0] - v[1])(d.execute_script(measure)) <= 40
        )
    finally:
        browser.switch_to.default_content()
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
