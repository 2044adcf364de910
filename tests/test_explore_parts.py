"""The explorer's second-version parts, driven in headless Chromium: the spectrum against dense
SVD, convmat.singular_values and torch's reshaped kernel; the formula against convmat.symbolic;
the values against torch's convolution; the step view's lit row against W; pinning; the model
page against the model's own layers. Many configurations run per page load, through the page's
``window.convmatExplorer``; the browser fixture is test_explore's."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from convmat import ConvMatError, conv_matrix, conv_transpose_matrix, singular_values, symbolic
from convmat.presentation import explore
from convmat.presentation.cli import main

from . import test_explore
from .test_explore import _kwargs, _load

browser = test_explore.browser  # the same Chromium fixture (one browser per module)

MODES = ("zeros", "reflect", "replicate", "circular")


def _config(rng):
    """A configuration in the page's JSON form, most of them valid (convmat decides)."""
    dims = rng.choice((1, 2, 2))
    per = lambda lo, hi: (rng.randint(lo, hi) if rng.random() < 0.6  # noqa: E731
                          else tuple(rng.randint(lo, hi) for _ in range(dims)))  # fmt: skip
    input_size = (rng.randint(2, 16),) if dims == 1 else (rng.randint(2, 6), rng.randint(2, 6))
    transposed = rng.random() < 0.3
    r = rng.random()
    if r < 0.5:
        padding = rng.randint(0, 2)
    elif r < 0.65 and not transposed:
        padding = "same"
    elif r < 0.75:
        padding = "valid"
    else:
        padding = tuple((rng.randint(0, 2), rng.randint(0, 2)) for _ in range(dims))
    stride, dilation = per(1, 2), per(1, 2)
    groups = rng.choice((1, 1, 2))
    return {
        "input": input_size, "kernel": per(1, 3), "stride": 1 if padding == "same" else stride,
        "dilation": dilation, "padding": padding,
        "padding_mode": "zeros" if transposed else rng.choice(MODES),
        "in_channels": groups * rng.randint(1, 2), "out_channels": groups * rng.randint(1, 2),
        "groups": groups, "transposed": transposed,
        "output_padding": rng.randint(0, 1) if transposed else 0, "flip": rng.random() < 0.3,
    }  # fmt: skip


def _accepted(rng, count):
    """``count`` configurations convmat accepts, with their symbolic W."""
    found = []
    while len(found) < count:
        config = _config(rng)
        try:
            found.append((config, symbolic(**_kwargs(config))))
        except ConvMatError:
            continue
    return found


def _oriented(weight, config):
    """The kernel as the cross-correlation reads it (flip=True reads it flipped)."""
    return weight.flip(tuple(range(2, weight.dim()))) if config["flip"] else weight


def _matrix(weight, config):
    """W from convmat, for the page's configuration and kernel."""
    kw = _kwargs(config)
    common = dict(stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"],
                  groups=kw["groups"])  # fmt: skip
    if config["transposed"]:
        return conv_transpose_matrix(_oriented(weight, config), kw["input_size"],
                                     output_padding=kw["output_padding"], **common)  # fmt: skip
    return conv_matrix(weight, kw["input_size"], padding_mode=kw["padding_mode"],
                       flip=config["flip"], **common)  # fmt: skip


def _circular_norm(weight, sym):
    """The norm of y[o, n] = sum w[o, c, m] x[c, (n*s + m*d) mod T] on the torus T (a multiple of
    the stride at least the padded input), from its dense matrix: numpy's SVD, no FFT."""
    g = sym.geometry
    if g.transposed:  # W is the matching convolution's W transposed: same norm
        cin, cout, in_size, out_size = g.out_channels, g.in_channels, g.output_size, g.input_size
    else:
        cin, cout, in_size, out_size = g.in_channels, g.out_channels, g.input_size, g.output_size
    w = weight.numpy()
    K = tuple(w.shape[2:])
    torus = tuple(
        s * max(o, -(-(i + b + a) // s))
        for s, o, i, (b, a) in zip(g.stride, out_size, in_size, g.padding)
    )
    small = tuple(t // s for t, s in zip(torus, g.stride))
    cin_g, cout_g = cin // g.groups, cout // g.groups
    rows, cols = math.prod(small), math.prod(torus)
    C = np.zeros((cout * rows, cin * cols))
    grids = np.meshgrid(*[np.arange(n) for n in small], indexing="ij")
    n_flat = np.ravel_multi_index(tuple(x.ravel() for x in grids), small)
    flip = sym.flip
    for m in np.ndindex(*K):
        read = tuple(
            (grid.ravel() * s + mm * d) % t
            for grid, s, mm, d, t in zip(grids, g.stride, m, g.dilation, torus)
        )
        q_flat = np.ravel_multi_index(read, torus)
        tap = tuple(k - 1 - mm for k, mm in zip(K, m)) if flip else m
        for o in range(cout):
            grp = o // cout_g
            for ci in range(cin_g):
                c = grp * cin_g + ci
                np.add.at(C, (o * rows + n_flat, c * cols + q_flat), w[(o, ci, *tap)])
    return float(np.linalg.svd(C, compute_uv=False)[0])


def test_spectrum_against_dense_svd_convmat_and_torch(browser):
    rng = random.Random(20261206)
    cases = _accepted(rng, 150)
    items = [{"config": c, "seed": i + 1} for i, (c, _) in enumerate(cases)]
    results = []
    for start in range(0, len(items), 50):
        results += browser.execute_script(
            "return window.convmatExplorer.spectrumMany(arguments[0])", items[start : start + 50]
        )
    checked = folded = 0
    for (config, sym), res in zip(cases, results):
        assert res["ok"], (config, res)
        weight = torch.tensor(res["weight"], dtype=torch.float64).reshape(res["weight_shape"])
        # torch.nn.utils.spectral_norm: the weight with dim first (1 for ConvTranspose), flattened.
        dim = 1 if config["transposed"] else 0
        mat = weight.movedim(dim, 0).reshape(weight.shape[dim], -1)
        reshaped = float(torch.linalg.matrix_norm(mat, ord=2))
        assert res["reshaped_shape"] == list(mat.shape), config
        assert abs(res["reshaped"] - reshaped) <= 1e-9 * reshaped, config
        circ = _circular_norm(weight, sym)
        assert abs(res["circular"] - circ) <= 1e-9 * circ, (config, res["circular"], circ)
        if res["too_large"]:
            assert (
                "sigma" not in res
                and min(res["rows"], res["cols"]) ** 2 * max(res["rows"], res["cols"]) > 3_000_000
            ), config
            continue
        W = _matrix(weight, config)
        dense = torch.linalg.svdvals(W)
        kw = _kwargs(config)
        del kw["flip"]
        if not config["transposed"]:
            del kw["output_padding"]
        else:
            del kw["padding_mode"]
        size = kw.pop("input_size")
        for name in ("kernel_size", "in_channels", "out_channels"):
            del kw[name]
        theirs = singular_values(_oriented(weight, config), size, **kw)
        sigma = torch.tensor(res["sigma"], dtype=torch.float64)
        top = float(dense[0])
        assert sigma.shape == dense.shape, config
        assert float((sigma - dense).abs().max()) <= 1e-9 * max(top, 1e-300), config
        assert float((sigma - theirs).abs().max()) <= 1e-9 * max(top, 1e-300), config
        assert abs(res["norm"] - top) <= 1e-9 * top, config
        if config["padding_mode"] == "zeros" or sym.geometry.padding == ((0, 0),) * len(size):
            assert res["norm"] <= circ * (1 + 1e-12), config  # W is a block of it
        else:
            folded += 1
        checked += 1
    assert checked >= 100 and folded >= 10, (checked, folded)


def _expected_formula(sym, row):
    rows, cols = sym.rows.tolist(), sym.cols.tolist()
    mine = sorted(c for r, c in zip(rows, cols) if r == row)
    labels = sym.labels([row], mine)[0] if mine else []
    terms = [
        ("(" + label.replace("+", " + ") + ")" if "+" in label else label)
        + "·"
        + sym.input_label(c)
        for label, c in zip(labels, mine)
    ]
    return sym.output_label(row) + " = " + (" + ".join(terms) if terms else "0")


def _layer(res_line, config):
    layer = eval(res_line.split("  #")[0], {"nn": nn}).double()  # the page's own line
    return layer, next(m for m in layer.modules() if isinstance(m, nn.modules.conv._ConvNd))


def test_formula_and_values_against_symbolic_and_torch(browser):
    rng = random.Random(7)
    cases = _accepted(rng, 70)
    items = []
    for i, (config, sym) in enumerate(cases):
        rows = sym.shape[0]
        chosen = list(range(rows)) if rows <= 10 else sorted(rng.sample(range(rows), 10))
        items.append({"config": config, "seed": 100 + i, "rows": chosen})
    results = browser.execute_script(
        "return window.convmatExplorer.valuesMany(arguments[0])", items
    )
    lines = browser.execute_script(
        "return arguments[0].map(c => window.convmatExplorer.compute(c, {entries: false}))",
        [c for c, _ in cases],
    )
    empty = 0
    for (config, sym), item, res, page in zip(cases, items, results, lines):
        assert res["ok"], config
        # The formula: W's row, in its order, named as convmat.symbolic names it.
        for row, text in zip(item["rows"], res["formulas"]):
            assert text == _expected_formula(sym, row), (config, row)
            empty += text.endswith(" = 0")
        # The values: y is torch's output for the page's x and kernel (integers: exact).
        layer, conv = _layer(page["pytorch"], config)
        weight = torch.tensor(res["w"], dtype=torch.float64).reshape(page["weight_shape"])
        with torch.no_grad():
            conv.weight.copy_(_oriented(weight, config))
            x = torch.tensor(res["x"], dtype=torch.float64).reshape(
                1, page["in_channels"], *page["input_size"]
            )
            y = layer(x).flatten()
        assert res["y"] == y.tolist(), config
        assert set(res["w"]) <= {-2.0, -1.0, 1.0, 2.0} and set(res["x"]) <= set(range(-3, 4))
        # The numbers line: its products add up to the y it names.
        for row, numbers in zip(item["rows"], res["numbers"]):
            if numbers == "= 0":  # no term: only padding
                assert res["y"][row] == 0 and res["formulas"][item["rows"].index(row)].endswith(
                    " = 0"
                )
                continue
            head, _, total = numbers.rpartition(" = ")
            assert float(total) == res["y"][row], (config, row)
            assert eval(head.removeprefix("= ").replace("·", "*")) == res["y"][row]
    assert empty >= 1  # some outputs read only padding


def _hover(browser, selector):
    return browser.execute_script(
        "const cell = document.querySelector(arguments[0]);"
        "cell.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));"
        "return window.convmatExplorer.highlighted();",
        selector,
    )


def test_step_view_lights_the_rows_of_w(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _load(browser, browser.page.as_uri())
    config = {"input": "5,6", "kernel": "3,2", "stride": "2,1", "padding": "1", "dilation": "1",
              "padding_mode": "reflect", "in_channels": "2", "out_channels": "2"}  # fmt: skip
    browser.execute_script("window.convmatExplorer.setConfig(arguments[0])", config)
    sym = symbolic((5, 6), (3, 2), stride=(2, 1), padding=1, padding_mode="reflect",
                   in_channels=2, out_channels=2)  # fmt: skip
    rows, cols = sym.rows.tolist(), sym.cols.tolist()
    n = sym.shape[0]
    for i in (0, 7, n - 1):
        lit = browser.execute_script("return window.convmatExplorer.step(arguments[0])", i)
        assert lit["w_rows"] == [i] and lit["step"] == i and lit["steps"] == n
        assert lit["inputs"] == sorted({c for r, c in zip(rows, cols) if r == i})
        assert lit["window"] == 2 * 6  # the kernel over both input channels
        assert lit["pinned_cells"] == [f"y{i}"]
        assert lit["equation"] == _expected_formula(sym, i)
    assert "&step=" + str(n - 1) in browser.execute_script("return location.hash")
    # The arrows step (and wrap), from the page with nothing focused.
    browser.execute_script("document.activeElement.blur()")
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    assert browser.execute_script("return window.convmatExplorer.highlighted()")["w_rows"] == [0]
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_LEFT).perform()
    lit = browser.execute_script("return window.convmatExplorer.highlighted()")
    assert lit["w_rows"] == [1] and lit["step"] == 1
    assert browser.find_element("id", "step-label").text.startswith(sym.output_label(1))
    # Play walks on by itself, and pauses.
    browser.execute_script("document.getElementById('speed').value = '30'")
    browser.find_element("id", "play").click()
    browser.execute_script("return new Promise(r => setTimeout(r, 400))")
    lit = browser.execute_script("return window.convmatExplorer.play(false)")
    assert lit["step"] >= 4 and lit["w_rows"] == [lit["step"]] and not lit["playing"]
    # A transposed layer: each input scatters its kernel into the outputs it feeds.
    config = {"input": "3,3", "kernel": "3", "stride": "2", "padding": "1", "transposed": True,
              "output_padding": "1", "in_channels": "1", "out_channels": "2"}  # fmt: skip
    browser.execute_script("window.convmatExplorer.setConfig(arguments[0])", config)
    sym = symbolic((3, 3), 3, stride=2, padding=1, transposed=True, output_padding=1,
                   out_channels=2)  # fmt: skip
    rows, cols = sym.rows.tolist(), sym.cols.tolist()
    for j in range(sym.shape[1]):
        lit = browser.execute_script("return window.convmatExplorer.step(arguments[0])", j)
        feeds = sorted({r for r, c in zip(rows, cols) if c == j})
        assert lit["w_cols"] == [j] and lit["outputs"] == feeds and lit["steps"] == sym.shape[1]
        assert len(lit["equation"].splitlines()) == len(feeds)
        assert all(f"·{sym.input_label(j)}" in line for line in lit["equation"].splitlines())


def test_click_pins_a_cell(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    _load(browser, browser.page.as_uri())
    config = {"input": "6", "kernel": "3", "padding": "1", "padding_mode": "circular"}
    browser.execute_script("window.convmatExplorer.setConfig(arguments[0])", config)
    browser.find_element(By.CSS_SELECTOR, '#grid-out .cell[data-row="2"]').click()
    lit = _hover(browser, '#grid-out .cell[data-row="4"]')  # the pin holds against a hover
    assert lit["w_rows"] == [2] and lit["pinned"] == {"role": "out", "row": 2}
    assert lit["equation"] == "y3 = w1·x2 + w2·x3 + w3·x4"
    browser.find_element(By.CSS_SELECTOR, '#grid-out .cell[data-row="2"]').click()  # let go
    lit = _hover(browser, '#grid-out .cell[data-row="4"]')
    assert lit["w_rows"] == [4] and lit["pinned"] is None
    assert lit["equation"] == "y5 = w1·x4 + w2·x5 + w3·x6"
    # An input, then an entry of W (a real click on the canvas), then Esc.
    browser.find_element(By.CSS_SELECTOR, '#grid-in .cell[data-col="0"]').click()
    lit = _hover(browser, '#grid-out .cell[data-row="3"]')
    assert lit["w_cols"] == [0] and lit["outputs"] == [0, 1, 5]  # circular: x1 feeds y6 too
    canvas = browser.find_element(By.ID, "w-over")
    cell, width, height = lit["w_cell"], canvas.size["width"], canvas.size["height"]
    ActionChains(browser, duration=0).move_to_element_with_offset(
        canvas, int(5.5 * cell - width / 2), int(0.5 * cell - height / 2)
    ).click().perform()
    lit = browser.execute_script("return window.convmatExplorer.highlighted()")
    assert lit["pinned"] == {"role": "w", "r": 0, "c": 5} and lit["w_entry"] == [0, 5]
    assert lit["info"].startswith("W[0, 5] = w1: kernel tap (0) joins input x6 to output y1")
    browser.execute_script("document.activeElement.blur()")
    ActionChains(browser).send_keys("\ue00c").perform()  # Esc
    assert browser.execute_script("return window.convmatExplorer.highlighted()")["pinned"] is None


def test_values_switch_edit_and_url(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _load(browser, browser.page.as_uri())
    config = {"input": "4,5", "kernel": "2,3", "padding": "0:1,1", "in_channels": "2",
              "out_channels": "3", "flip": True}  # fmt: skip
    browser.execute_script("window.convmatExplorer.setConfig(arguments[0])", config)
    browser.find_element(By.ID, "values-on").click()
    vals = browser.execute_script("return window.convmatExplorer.values()")
    assert vals["on"] and vals["seed"] == 1
    res = browser.execute_script("return window.convmatExplorer.current()")
    weight = torch.tensor(vals["w"], dtype=torch.float64).reshape(res["weight_shape"])
    W = _matrix(weight, {**config, "transposed": False, "input": (4, 5), "kernel": (2, 3),
                         "padding": ((0, 1), (1, 1)), "stride": 1, "dilation": 1,
                         "padding_mode": "zeros", "groups": 1, "in_channels": 2,
                         "out_channels": 3, "output_padding": 0})  # fmt: skip
    x = torch.tensor(vals["x"], dtype=torch.float64)
    assert vals["y"] == (W @ x).tolist()
    # The numbers are written into the cells of x (padding reads 0) and y.
    shown_y = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#grid-out .cell")]
    assert shown_y == [str(int(v)) for v in vals["y"]]
    shown_x = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#grid-in .cell[data-col]")]
    assert shown_x == [str(int(v)) for v in vals["x"]]
    # Editing x recomputes y; the link keeps the edit.
    field = browser.find_element(By.ID, "x-values")
    edited = [(i % 5) - 2 for i in range(len(vals["x"]))]
    field.clear()
    field.send_keys(" ".join(map(str, edited)) + Keys.ENTER)
    now = browser.execute_script("return window.convmatExplorer.values()")
    assert now["x"] == edited and now["w"] == vals["w"]
    assert now["y"] == (W @ torch.tensor(edited, dtype=torch.float64)).tolist()
    lit = browser.execute_script("return window.convmatExplorer.hoverOutput(7)")
    head, _, total = lit["equation"].splitlines()[1].rpartition(" = ")
    assert float(total) == now["y"][7] == eval(head.removeprefix("= ").replace("·", "*"))
    href = browser.execute_script("return location.href")
    assert "&values=1&xv=" + ",".join(map(str, edited)) in href
    _load(browser, href)
    assert browser.execute_script("return window.convmatExplorer.values()") == now
    # A wrong count is refused with a word, the numbers stay.
    field = browser.find_element(By.ID, "x-values")
    field.clear()
    field.send_keys("1 2 3" + Keys.ENTER)
    assert browser.find_element(By.ID, "values-error").text == "x needs 40 numbers, got 3"
    assert browser.execute_script("return window.convmatExplorer.values()") == now
    # New numbers: the next seed, drawn afresh.
    browser.find_element(By.ID, "redraw").click()
    drawn = browser.execute_script("return window.convmatExplorer.values()")
    assert drawn["seed"] == 2 and drawn["x"] != now["x"]
    assert "seed=2" in browser.execute_script("return location.hash")


def test_spectrum_panel_and_its_limit(browser):
    from selenium.webdriver.common.by import By

    _load(browser, browser.page.as_uri())
    config = {"input": "6,6", "kernel": "3", "padding": "1", "in_channels": "2",
              "out_channels": "2"}  # fmt: skip
    browser.execute_script("window.convmatExplorer.setConfig(arguments[0])", config)
    spec = browser.execute_script("return window.convmatExplorer.spectrum()")
    shown = {td.get_attribute("data-key"): td.text
             for td in browser.find_elements(By.CSS_SELECTOR, "#spec-table td.v")}  # fmt: skip
    assert sorted(shown) == ["circular", "norm", "reshaped"]
    for key, text in shown.items():  # six digits of each
        assert abs(float(text) - spec[key]) <= 5e-6 * spec[key], key
    assert spec["reshaped"] < spec["norm"] <= spec["circular"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#spec-plot rect")) == 72
    why = browser.find_element(By.ID, "spec-why").text
    assert why.startswith("Why they differ:") and "bounds ‖W‖ from above" in why
    # Too large for the page: said so, the two cheap numbers still there.
    big = {"input": "20,20", "kernel": "3", "padding": "1", "in_channels": "2",
           "out_channels": "2"}  # fmt: skip
    browser.execute_script("window.convmatExplorer.setConfig(arguments[0])", big)
    spec = browser.execute_script("return window.convmatExplorer.spectrum()")
    assert spec["too_large"] and spec["reshaped"] > 0 and spec["circular"] > 0
    assert (
        "its singular values are computed on this page up to"
        in browser.find_element(By.ID, "sub-spec").text
    )


# ---- your own model ----------------------------------------------------------------------------

_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.blocks = nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, (3, 1)))
        self.up = nn.ConvTranspose2d(6, 3, 3, stride=2, padding=1)
        self.big = nn.Conv2d(3, 64, 3, padding="same")

    def forward(self, x):
        x = self.dw(self.dw(self.stem(x)))
        x = self.blocks(x)
        x = self.up(x, output_size=(2 * x.shape[2], 2 * x.shape[3]))
        return self.big(x.repeat(1, 1, 5, 5))


def make():
    return Net()
"""


def test_model_page_against_the_models_layers(browser, tmp_path, monkeypatch, capsys):
    from selenium.webdriver.common.by import By

    (tmp_path / "tiny_net.py").write_text(_MODEL, encoding="utf-8")
    page = tmp_path / "model.html"
    assert main(["explore", "--model", str(tmp_path / "tiny_net.py") + ":make", "--input",
                 "3,12,14", "-o", str(page), "--no-open"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("7 convolution call(s) in ")
    # The test's own record of every conv call: path, module, input and output.
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_net

    model, seen = tiny_net.make().eval(), []
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            m.register_forward_hook(lambda m, a, kw, out, p=path: seen.append((p, m, a[0], kw, out)),
                                    with_kwargs=True)  # fmt: skip
    with torch.no_grad():
        model(torch.randn(1, 3, 12, 14))
    _load(browser, page.as_uri())
    rows = browser.execute_script("return window.convmatExplorer.modelRows()")
    names = ["stem", "dw", "dw (call 2)", "blocks.0", "blocks.2", "up", "big"]
    assert [r["path"] for r in rows] == names and len(seen) == 7
    for i, (row, (path, m, x, kw, out)) in enumerate(zip(rows, seen)):
        assert row["input"] == " × ".join(map(str, x.shape[1:])), path
        assert row["output"] == " × ".join(map(str, out.shape[1:])), path
        matrix = (math.prod(out.shape[1:]), math.prod(x.shape[1:]))
        assert row["matrix"] == " × ".join(map(str, matrix)), path
        taps = m.weight.numel() * math.prod(
            (x if isinstance(m, nn.ConvTranspose2d) else out).shape[2:]
        )
        assert row["drawable"] == (taps <= 4_000_000), path  # the page's own limit
        if not row["drawable"]:  # shapes and formulas only
            assert "too large for the page" in row["text"] and "W: 179200 x 8400" in row["text"]
            continue
        # Its W, a click away: the page's W times the model's own weight is the layer.
        browser.find_element(By.CSS_SELECTOR, f'#model-table tr[data-layer="{i}"] button').click()
        assert browser.execute_script("return window.convmatExplorer.extras().layer") == i
        res = browser.execute_script(
            "return window.convmatExplorer.compute(window.convmatExplorer.getConfig())"
        )
        assert (res["rows"], res["cols"]) == matrix, path
        W = torch.zeros(matrix, dtype=torch.float64)
        flat = m.weight.detach().double().flatten()
        for r, c, t in res["entries"]:
            W[r, c] = flat[t].sum()
        bias = (
            0
            if m.bias is None
            else m.bias.detach().double().repeat_interleave(math.prod(out.shape[2:]))
        )
        conv = m.double()
        with torch.no_grad():
            y = conv(x.double(), **kw).flatten()
        m.float()
        torch.testing.assert_close(W @ x.double().flatten() + bias, y, rtol=1e-12, atol=1e-12)
    chosen = [r["chosen"] for r in browser.execute_script(
        "return window.convmatExplorer.modelRows()")]  # fmt: skip
    assert chosen == [False] * 5 + [True, False]
    assert "&layer=5" in browser.execute_script("return location.hash")
    # A link naming a layer opens on it; the page alone opens on the first it can draw.
    _load(browser, page.as_uri() + "#layer=3")
    rows = browser.execute_script("return window.convmatExplorer.modelRows()")
    assert [r["chosen"] for r in rows] == [i == 3 for i in range(7)]
    assert browser.execute_script("return window.convmatExplorer.getConfig()")["kernel"] == "1,1"
    _load(browser, page.as_uri())
    assert browser.execute_script("return window.convmatExplorer.extras().layer") == 0


def test_model_layers_python_side(tmp_path, capsys):
    net = nn.Sequential(nn.Conv3d(2, 2, 3, padding=1), nn.Flatten(2), nn.Conv1d(2, 3, 5, stride=2))
    first, second = explore.model_layers(net, (2, 4, 4, 4))
    assert first["config"] is None and first["why"].startswith("a 3-D layer")
    assert first["matrix_shape"] == [128, 128] and first["formula"][-1].startswith("W: 128 x 128")
    assert second["config"]["input"] == "64" and second["output_shape"] == [3, 30]
    with pytest.raises(ConvMatError, match=r"does not run on an input of shape \(1, 3, 4, 4\)"):
        explore.model_layers(net, (3, 4, 4))
    (tmp_path / "m.py").write_text("from torch import nn\ndef make(): return nn.ReLU()\n")
    spec = str(tmp_path / "m.py") + ":make"
    for argv, message in [
        (["--input", "3,8,8"], "runs no convolution"),
        (["--input", "3,8,8", "--stride", "2"], "--stride set one layer; with --model"),
        ([], "--model needs --input"),
        (["--input", "8"], "--input must be C,N[,N...] with --model"),
        (["--input", "3,8,8", "--weights", "w.pt"], "--weights file 'w.pt' does not exist"),
    ]:
        assert main(["explore", "--model", spec, "--no-open", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("convmat: error: ") and message in err, (
            argv, err,
        )  # fmt: skip
    assert main(["explore", "--weights", "w.pt", "--no-open"]) == 2
    assert "--weights needs --model" in capsys.readouterr().err


# ---- the page's state, as a state machine ------------------------------------------------------

_POOL = [
    {"input": "5,5", "kernel": "3", "stride": "2", "padding": "1"},
    {"input": "4", "kernel": "3", "stride": "2", "transposed": True, "output_padding": "1"},
    {"input": "6", "kernel": "3", "padding": "1", "padding_mode": "reflect"},
    {"input": "3,4", "kernel": "2", "in_channels": "2", "out_channels": "2", "groups": "2"},
]


def test_page_state_machine(browser):
    """Steps, keys, clicks, Esc, values, new numbers, other settings and reloads, in any order:
    the page's step, pin, lit row or column, values and link agree with a model of them."""
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    counts = []
    for c in _POOL:
        sym = symbolic(**_kwargs(_with_defaults(c)))
        counts.append(sym.shape[1] if c.get("transposed") else sym.shape[0])
    js = "return window.convmatExplorer"

    class Page(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            # Another layer and back: no step, no pin; values off at seed 1.
            browser.execute_script(js + ".setConfig(arguments[0])", _POOL[1])
            browser.execute_script(js + ".setConfig(arguments[0])", _POOL[0])
            browser.execute_script(js + ".setValues(false, 1)")
            self.which, self.step, self.pinned, self.values, self.seed = 0, -1, None, False, 1

        def _pin_of(self, i):
            role = "in" if _POOL[self.which].get("transposed") else "out"
            return {"role": role, ("col" if role == "in" else "row"): i}

        @rule(which=st.integers(0, len(_POOL) - 1))
        def other_settings(self, which):
            browser.execute_script(js + ".setConfig(arguments[0])", _POOL[which])
            if which != self.which:
                self.which, self.step, self.pinned = which, -1, None

        @rule(i=st.integers(-3, 40))
        def step_to(self, i):
            browser.execute_script(js + ".step(arguments[0])", i)
            self.step = i % counts[self.which]
            self.pinned = self._pin_of(self.step)

        @rule(key=st.sampled_from(["ArrowRight", "ArrowLeft", "Escape"]))
        def press(self, key):
            browser.execute_script(
                "document.dispatchEvent(new KeyboardEvent('keydown', {key: arguments[0]}))", key
            )
            n = counts[self.which]
            if key == "Escape":
                self.pinned = None
                return
            if key == "ArrowRight":
                self.step = (self.step + 1) % n
            else:  # from no step at all: the last
                self.step = n - 1 if self.step < 0 else (self.step - 1) % n
            self.pinned = self._pin_of(self.step)

        @rule(r=st.integers(0, 40))
        def click_output(self, r):
            r %= counts[self.which] if not _POOL[self.which].get("transposed") else 8
            browser.execute_script(
                'document.querySelector(`#grid-out .cell[data-row="${arguments[0]}"]`).click()', r
            )
            pin = {"role": "out", "row": r}
            if self.pinned == pin:
                self.pinned = None
            else:
                self.pinned = pin
                self.step = -1 if _POOL[self.which].get("transposed") else r

        @rule()
        def switch_values(self):
            browser.execute_script("document.getElementById('values-on').click()")
            self.values = not self.values

        @rule()
        def new_numbers(self):
            browser.execute_script("document.getElementById('redraw').click()")
            self.values, self.seed = True, self.seed + 1

        @rule()
        def reload(self):
            _load(browser, browser.execute_script("return location.href"))
            self.pinned = self._pin_of(self.step) if self.step >= 0 else None

        @invariant()
        def agrees(self):
            lit, vals, link = browser.execute_script(
                "const e = window.convmatExplorer;"
                "return [e.highlighted(), e.values(), location.hash]"
            )
            assert (lit["step"], lit["pinned"]) == (self.step, self.pinned)
            assert lit["steps"] == counts[self.which]
            if self.pinned and self.pinned["role"] == "out":
                assert lit["w_rows"] == [self.pinned["row"]]
                assert lit["pinned_cells"] == ["y" + str(self.pinned["row"])]
            elif self.pinned:
                assert lit["w_cols"] == [self.pinned["col"]]
                assert lit["pinned_cells"] == ["x" + str(self.pinned["col"])]
            assert (vals["on"], vals["seed"]) == (self.values, self.seed)
            assert ("&values=1" in link) == self.values
            assert ("&step=" in link) == (self.step >= 0)

    run = Page.TestCase
    run.settings = settings(max_examples=8, stateful_step_count=10, deadline=None)
    run().runTest()


def _with_defaults(config):
    """A pool entry with the page's defaults filled in (the JSON form of test_explore)."""
    full = {"input": "8", "kernel": "3", "stride": "1", "dilation": "1", "padding": "0",
            "padding_mode": "zeros", "in_channels": "1", "out_channels": "1", "groups": "1",
            "transposed": False, "output_padding": "0", "flip": False, **config}  # fmt: skip
    ints = lambda v: tuple(map(int, v.split(","))) if "," in v else int(v)  # noqa: E731
    out = {k: ints(v) if isinstance(v, str) and k != "padding_mode" else v for k, v in full.items()}
    for k in ("in_channels", "out_channels", "groups"):
        out[k] = int(out[k])
    return out
