"""The explorer page: its W, its refusals and its PyTorch line against convmat.symbolic and torch,
driven in headless Chromium (Selenium with Debian's chromium and chromedriver); its hover links, its
URL and the README's screenshot. The page itself is written by convmat.presentation.explore."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from convmat import ConvMatError, conv_matrix, conv_transpose_matrix, symbolic
from convmat.presentation import explore

ROOT = Path(__file__).resolve().parent.parent
MODES = ("zeros", "reflect", "replicate", "circular")
N_RANDOM = 240

# ---- the Python side, no browser ---------------------------------------------------------------


def test_page_is_one_self_contained_file(tmp_path):
    path = explore.write_page(tmp_path / "page.html", {"input": (6, 6), "transposed": True})
    text = path.read_text(encoding="utf-8")
    assert text.count("<script>") == 1 and text.count("<style>") == 1
    assert "http://" not in text and "https://" not in text  # nothing to fetch: works offline
    assert '"input": "6,6"' in text and '"transposed": true' in text
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_page_url_and_config_errors(tmp_path):
    url = explore.page_url(tmp_path / "p.html", {"padding": ((1, 2), 0), "flip": "1"})
    assert url == (tmp_path / "p.html").absolute().as_uri() + "#padding=1:2,0&flip=1"
    with pytest.raises(ConvMatError, match=r"unknown settings \['strides'\]"):
        explore.page_html({"strides": 2})
    with pytest.raises(ConvMatError, match=r"cannot write the page to .*nowhere"):
        explore.write_page(tmp_path / "nowhere" / "p.html")


def _command(argv):
    parser = argparse.ArgumentParser()
    explore.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["explore", *argv])


def test_command_writes_and_opens(tmp_path, monkeypatch, capsys):
    opened = []
    monkeypatch.setattr(explore.webbrowser, "open", lambda url: opened.append(url) or True)
    args = _command(
        [
            "-o",
            str(tmp_path / "x.html"),
            "--input",
            "4,4",
            "--kernel",
            "3",
            "--stride",
            "2",
            "--padding",
            "1",
            "--transposed",
            "--output-padding",
            "1",
        ]
    )
    args.run(args)
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'x.html'}" in out
    assert opened == [
        explore.page_url(
            tmp_path / "x.html",
            {
                "input": "4,4",
                "kernel": "3",
                "stride": "2",
                "padding": "1",
                "transposed": True,
                "output_padding": "1",
            },
        )
    ]
    assert '"output_padding": "1"' in (tmp_path / "x.html").read_text(encoding="utf-8")
    args = _command(["--no-open", "--padding", "same"])
    args.run(args)
    assert len(opened) == 1 and capsys.readouterr().out.startswith("wrote ")
    with pytest.raises(SystemExit):
        _command(["--padding", "1;2"])


def test_open_page(monkeypatch):
    opened = []
    monkeypatch.setattr(explore.webbrowser, "open", lambda url: opened.append(url) or True)
    url = explore.open_page({"input": 8})
    assert opened == [url] and url.startswith("file://") and url.endswith("#input=8")
    assert Path(url[len("file://") :].split("#")[0]).is_file()


# ---- the browser -------------------------------------------------------------------------------


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium(), shutil.which("chromedriver")
    if binary is None:
        pytest.skip("no chromium installed (apt-get install chromium chromium-driver)")
    if driver_path is None:
        pytest.skip(
            "chromium is installed but chromedriver is not (apt-get install chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="convmat-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    page = explore.write_page(Path(profile) / "explorer.html")
    driver.get(page.as_uri())
    driver.page = page
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _per_dim(rng, dims, lo, hi):
    if dims == 2 and rng.random() < 0.4:
        return tuple(rng.randint(lo, hi) for _ in range(dims))
    return rng.randint(lo, hi)


def _random_config(rng):
    """A configuration in the page's JSON form; about half of them torch refuses."""
    dims = rng.choice((1, 1, 2, 2, 2))
    if dims == 1:
        size = rng.randint(1, 12) if rng.random() < 0.8 else rng.randint(13, 64)
        input_size = size if rng.random() < 0.7 else (size,)
    else:
        input_size = (rng.randint(1, 7), rng.randint(1, 7))
    kernel = _per_dim(rng, dims, 1, 4) if rng.random() < 0.95 else 0
    stride = _per_dim(rng, dims, 1, 3) if rng.random() < 0.97 else 0
    dilation = _per_dim(rng, dims, 1, 2)
    r = rng.random()
    if r < 0.35:
        padding = rng.randint(0, 2)
    elif r < 0.5:
        padding = "same"
    elif r < 0.57:
        padding = "valid"
    elif r < 0.82:
        padding = tuple(
            (rng.randint(0, 3), rng.randint(0, 3)) if rng.random() < 0.6 else rng.randint(0, 2)
            for _ in range(dims)
        )
    elif r < 0.88:
        padding = -1
    elif r < 0.93:
        padding = "full"
    else:
        padding = (1,) * (3 - dims)  # the wrong number of dims
    transposed = rng.random() < 0.3
    groups = rng.choice((1, 1, 1, 2, 3)) if rng.random() < 0.97 else 0
    if rng.random() < 0.9:
        in_channels = max(groups, 1) * rng.randint(1, 2)
        out_channels = max(groups, 1) * rng.randint(1, 2)
    else:
        in_channels, out_channels = rng.randint(1, 4), rng.randint(1, 4)
    return {
        "input": input_size, "kernel": kernel, "stride": stride, "dilation": dilation,
        "padding": padding, "padding_mode": "zeros" if transposed else rng.choice(MODES),
        "in_channels": in_channels, "out_channels": out_channels, "groups": groups,
        "transposed": transposed, "output_padding": _per_dim(rng, dims, 0, 2),
        "flip": rng.random() < 0.3,
    }  # fmt: skip


def _kwargs(config):
    """The page's JSON form -> convmat.symbolic's keyword arguments."""
    tup = lambda v: tuple(tup(x) for x in v) if isinstance(v, list | tuple) else v  # noqa: E731
    return dict(
        input_size=tup(config["input"]), kernel_size=tup(config["kernel"]),
        stride=tup(config["stride"]), padding=tup(config["padding"]),
        dilation=tup(config["dilation"]), in_channels=config["in_channels"],
        out_channels=config["out_channels"], groups=config["groups"],
        padding_mode=config["padding_mode"], transposed=config["transposed"],
        output_padding=tup(config["output_padding"]), flip=config["flip"],
    )  # fmt: skip


def _expected_entries(sym):
    """{(row, col): taps} of convmat.symbolic (flat weight indices, ascending; with
    ``flip=True`` those of the flipped kernel)."""
    rows, cols, taps = sym.rows.tolist(), sym.cols.tolist(), sym.taps.tolist()
    return {(r, c): tuple(t for t in ts if t >= 0) for r, c, ts in zip(rows, cols, taps)}


def _dense(res, weight):
    W = torch.zeros(res["rows"], res["cols"], dtype=torch.float64)
    flat = weight.flatten()
    for r, c, taps in res["entries"]:
        W[r, c] = flat[taps].sum()
    return W


def _check_torch_line(res, config):
    """Build the layer from the page's line of PyTorch; its output is W x for the page's W."""
    line = res["pytorch"].split("  #")[0]
    layer = eval(line, {"nn": nn}).double()  # the page's own line, verbatim
    conv = next(m for m in layer.modules() if isinstance(m, nn.modules.conv._ConvNd))
    g = torch.Generator().manual_seed(len(res["entries"]))
    weight = torch.randint(-4, 5, res["weight_shape"], generator=g).double()
    spatial = tuple(range(2, weight.dim()))
    with torch.no_grad():
        conv.weight.copy_(weight.flip(spatial) if config["flip"] else weight)
    x = torch.randint(-4, 5, (1, res["in_channels"], *res["input_size"]), generator=g).double()
    with torch.no_grad():
        y = layer(x)
    assert list(y.shape[2:]) == res["output_size"], line
    W = _dense(res, weight)
    torch.testing.assert_close(y.flatten(), W @ x.flatten(), rtol=0, atol=0, msg=line)
    kw = _kwargs(config)
    common = dict(stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"],
                  groups=kw["groups"])  # fmt: skip
    if config["transposed"]:  # no flip= here: the true transposed convolution's kernel, flipped
        oriented = weight.flip(spatial) if config["flip"] else weight
        ref = conv_transpose_matrix(oriented, kw["input_size"],
                                    output_padding=kw["output_padding"], **common)  # fmt: skip
    else:
        ref = conv_matrix(weight, kw["input_size"], padding_mode=kw["padding_mode"],
                          flip=config["flip"], **common)  # fmt: skip
    torch.testing.assert_close(W, ref, rtol=0, atol=0, msg=line)


def test_random_configurations_match_convmat(browser):
    rng = random.Random(20261126)
    configs = [_random_config(rng) for _ in range(N_RANDOM)]
    results = []
    for start in range(0, N_RANDOM, 80):  # three calls keep each reply small
        results += browser.execute_script(
            "return window.convmatExplorer.computeMany(arguments[0])", configs[start : start + 80]
        )
    accepted, refused, messages = 0, 0, set()
    for config, res in zip(configs, results):
        kw = _kwargs(config)
        try:
            sym = symbolic(**kw)
        except ConvMatError as err:
            assert not res["ok"], f"the page accepts {config}, convmat refuses: {err}"
            assert res["error"] == str(err), config
            refused += 1
            messages.add(str(err).split(" ")[0] + str(err).split(" ")[1])
            continue
        assert res["ok"], f"the page refuses {config}: {res['error']}"
        accepted += 1
        assert (res["rows"], res["cols"]) == sym.shape, config
        assert tuple(res["output_size"]) == sym.geometry.output_size, config
        got = {(r, c): tuple(taps) for r, c, taps in res["entries"]}
        assert len(got) == len(res["entries"]), config  # one entry per (row, col)
        assert got == _expected_entries(sym), config
        _check_torch_line(res, config)
    assert accepted >= 90 and refused >= 60, (accepted, refused)
    assert len(messages) >= 8, messages  # many different refusals, not one repeated


def test_labels_and_form_syntax(browser):
    js = "return window.convmatExplorer.compute(arguments[0], {labels: true})"
    res = browser.execute_script(js, {"input": "4", "kernel": "3", "padding": "1",
                                      "padding_mode": "reflect"})  # fmt: skip
    sym = symbolic(4, 3, padding=1, padding_mode="reflect")
    labels = sym.labels()
    assert [(r, c, label) for r, c, _, label in res["entries"]] == [
        (r, c, labels[r][c]) for r in range(4) for c in range(4) if labels[r][c] != "0"
    ]
    assert res["pytorch"] == "nn.Conv1d(1, 1, 3, padding=1, bias=False, padding_mode='reflect')"
    # The command's syntax: one before:after pair applies to every dim.
    config = {"input": "5,6", "kernel": "3,2", "padding": "1:2", "stride": "2,1",
              "in_channels": "4", "out_channels": "2", "groups": "2", "flip": True}  # fmt: skip
    res = browser.execute_script(js, config)
    sym = symbolic((5, 6), (3, 2), padding=((1, 2), (1, 2)), stride=(2, 1), in_channels=4,
                   out_channels=2, groups=2, flip=True)  # fmt: skip
    assert {(r, c): tuple(t) for r, c, t, _ in res["entries"]} == _expected_entries(sym)
    assert res["pytorch"] == (
        "nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(4, 2, (3, 2), stride=(2, 1), "
        "groups=2, bias=False))  # true convolution: give it the kernel flipped, "
        "weight = w.flip(-2, -1)"
    )
    bad = browser.execute_script(js, {"input": "5", "kernel": "3", "padding": "1;2"})
    assert bad == {"ok": False, "settings": False,
                   "error": "padding must be an int, a tuple of 1 ints, a tuple of 1 "
                   "(before, after) pairs, 'valid' or 'same', got '1;2'"}  # fmt: skip
    bad = browser.execute_script(js, {"input": "5", "kernel": "3x"})
    assert bad == {"ok": False, "settings": True,  # the page's own word, not a refusal
                   "error": "kernel: expected comma-separated ints, got '3x'"}  # fmt: skip
    refused = browser.execute_script(js, {"input": "5", "kernel": "3", "transposed": True,
                                          "padding_mode": "reflect"})  # fmt: skip
    assert refused["error"] == (
        "padding_mode must be 'zeros' for a transposed convolution (as in torch), got 'reflect'"
    )


def _load(browser, url):
    """A fresh load (not a same-document jump, whose hashchange would come later)."""
    browser.get("about:blank")
    browser.get(url)


def _hover(browser, selector):
    return browser.execute_script(
        "const cell = document.querySelector(arguments[0]);"
        "cell.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));"
        "return window.convmatExplorer.highlighted();",
        selector,
    )


def test_hover_links_input_output_and_w(browser):
    config = {"input": "5,6", "kernel": "3", "stride": "2,1", "padding": "1",
              "padding_mode": "reflect", "in_channels": "2", "out_channels": "2"}  # fmt: skip
    browser.execute_script("window.convmatExplorer.setConfig(arguments[0])", config)
    sym = symbolic((5, 6), 3, stride=(2, 1), padding=1, padding_mode="reflect", in_channels=2,
                   out_channels=2)  # fmt: skip
    rows, cols = sym.rows.tolist(), sym.cols.tolist()
    row = 21  # y[1,0,3]: its window reaches into the reflected border
    lit = _hover(browser, f'#grid-out .cell[data-row="{row}"]')
    assert lit["inputs"] == sorted({c for r, c in zip(rows, cols) if r == row})
    assert lit["w_rows"] == [row] and lit["w_cols"] == []
    assert lit["window"] == 2 * 9  # both input channels, every tap, padded cells included
    assert lit["info"].startswith("y[1,0,3] is row 21 of W")
    col = 40  # x[1,1,4]
    lit = _hover(browser, f'#grid-in .cell[data-col="{col}"]')
    assert lit["outputs"] == sorted({r for r, c in zip(rows, cols) if c == col})
    assert lit["w_cols"] == [col] and lit["w_rows"] == []
    # A real mouse over W's entry (row, col): the page names its tap, input and output.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = browser.find_element(By.ID, "w-over")
    cell = lit["w_cell"]
    r, c = row, next(c for r2, c in zip(rows, cols) if r2 == row)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    width, height = canvas.size["width"], canvas.size["height"]
    ActionChains(browser, duration=0).move_to_element_with_offset(
        canvas, int((c + 0.5) * cell - width / 2), int((r + 0.5) * cell - height / 2)
    ).perform()
    lit = browser.execute_script("return window.convmatExplorer.highlighted()")
    label = sym.labels([r], [c])[0][0]
    assert lit["w_entry"] == [r, c]
    assert lit["info"].startswith(f"W[{r}, {c}] = {label.replace('+', ' + ')}: kernel tap")
    assert f"joins input {sym.input_label(c)} to output {sym.output_label(r)}" in lit["info"]


def test_url_round_trip(browser, tmp_path):
    from selenium.webdriver.common.by import By

    config = {"input": "6,5", "kernel": "3,2", "stride": "2", "dilation": "1,2",
              "padding": "1:0,2", "padding_mode": "replicate", "in_channels": "4",
              "out_channels": "6", "groups": "2", "transposed": False, "output_padding": "0",
              "flip": True}  # fmt: skip
    browser.execute_script("window.convmatExplorer.setConfig(arguments[0])", config)
    href = browser.execute_script("return location.href")
    assert "#input=6,5&kernel=3,2&" in href and "padding=1:0,2&padding-mode=replicate" in href
    shown = browser.execute_script("return window.convmatExplorer.current()")
    _load(browser, href)  # a fresh load of the shared link
    assert browser.execute_script("return window.convmatExplorer.getConfig()") == config
    assert browser.execute_script("return window.convmatExplorer.current()") == shown
    # The link Python builds for the command opens on the same settings.
    _load(browser, explore.page_url(browser.page, config))
    assert browser.execute_script("return window.convmatExplorer.getConfig()") == config
    # A page written with settings opens on them with no fragment at all.
    written = explore.write_page(tmp_path / "p.html", {"input": (9,), "stride": 3})
    _load(browser, written.as_uri())
    got = browser.execute_script("return window.convmatExplorer.getConfig()")
    assert (got["input"], got["stride"], got["padding"]) == ("9", "3", "0")
    # Typing in the form updates the page and its link.
    field = browser.find_element(By.NAME, "stride")
    field.clear()
    field.send_keys("2")
    browser.execute_script("return new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)))")
    assert "stride=2" in browser.execute_script("return location.hash")
    assert (
        browser.find_element(By.ID, "torch-line").text == "nn.Conv1d(1, 1, 3, stride=2, bias=False)"
    )


def test_large_input_and_screenshot(browser):
    # 64 x 64 with channels: drawn, and fast enough to hover.
    big = {"input": "64,64", "kernel": "3", "padding": "same", "padding_mode": "circular",
           "in_channels": "2", "out_channels": "2"}  # fmt: skip
    _load(browser, explore.page_url(browser.page, big))
    lit = _hover(browser, '#grid-out .cell[data-row="4100"]')
    assert lit["w_rows"] == [4100] and len(lit["inputs"]) == 18
    # A stride-2 transposed 2-D convolution with output padding 1.
    shot = {"input": "4,4", "kernel": "3", "stride": "2", "padding": "1", "transposed": True,
            "output_padding": "1"}  # fmt: skip
    _load(browser, explore.page_url(browser.page, shot))
    lit = _hover(browser, '#grid-out .cell[data-row="27"]')  # y[0,3,3]
    assert lit["inputs"] == [5, 6, 9, 10] and lit["w_rows"] == [27]
    # The README's picture: a stride-2 convolution with values on, stepped to y[0,1,1].
    shot = {"input": "5,5", "kernel": "3", "stride": "2", "padding": "1"}
    _load(browser, explore.page_url(browser.page, shot) + "&values=1&step=4")
    lit = browser.execute_script("return window.convmatExplorer.highlighted()")
    assert lit["w_rows"] == [4] and lit["pinned_cells"] == ["y4"]
    assert lit["equation"].startswith("y[0,1,1] = w[0,0,0,0]·x[0,1,1] + w[0,0,0,1]·x[0,1,2]")
    browser.set_window_size(1300, 900)
    height = browser.execute_script("return document.body.scrollHeight")
    inner = browser.execute_script("return window.outerHeight - window.innerHeight")
    browser.set_window_size(1300, height + inner)
    target = (ROOT / "docs" / "explorer.png") if os.environ.get("CONVMAT_SCREENSHOT") else None
    path = target or Path(tempfile.mkdtemp()) / "explorer.png"
    assert browser.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    # The copy button answers (through the clipboard API or the selection fallback).
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "copy-torch").click()
    browser.execute_script("return new Promise(r => setTimeout(r, 50))")
    assert browser.find_element(By.ID, "copied").text == "copied"
    # Nothing went wrong in the page's script through all of this module's tests.
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
