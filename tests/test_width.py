"""The certified interval to a requested width: ``operator_norm(..., width=)``, the enclosing
circular convolution's certificate (every frequency proven by a Cholesky test with its rounding
bounded) and the windowed lower end, against dense SVD and ARPACK."""

from __future__ import annotations

import math
import types
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.sparse.linalg import ArpackError, svds

from convmat import ConvMatError, ConvOperator, operator_norm, singular_values
from convmat.analysis import torus

from .reference import conv_configs, conv_transpose_configs
from .test_spectral import dense


def _arpack_norm(op):
    """ARPACK's largest singular value (a deterministic start and a roomy basis: its restarts
    fail on some small operators otherwise). Where ARPACK cannot restart (error 3, no shifts:
    every singular value the same, as for a 1 x 1 kernel on one channel, or a 600-long 1-D
    layer with one channel) the dense SVD's where W is small, else LOBPCG's, run to its
    tolerance (its default 20 iterations stopped 3e-4 below the norm of such a layer)."""
    n = min(op.shape)
    start = np.random.default_rng(0).standard_normal(n)
    try:
        return svds(op.to_scipy(), k=1, return_singular_vectors=False, tol=1e-12,
                    ncv=min(n, 40), v0=start)[0]  # fmt: skip
    except ArpackError:
        if op.shape[0] * op.shape[1] <= 2**24:
            return float(torch.linalg.matrix_norm(op.to_dense(), ord=2))
        return svds(op.to_scipy(), k=1, return_singular_vectors=False, tol=1e-12,
                    solver="lobpcg", v0=start, maxiter=5000)[0]  # fmt: skip


def _op(cfg, w):
    return ConvOperator(w, cfg.input_size, transposed=cfg.transposed, **cfg.matrix_kwargs())


@settings(deadline=None, max_examples=60)
@given(cfg=st.one_of(conv_configs(dims=(1, 2)), conv_transpose_configs(dims=(1, 2))),
       seed=st.integers(0, 2**16), width=st.sampled_from([1e-1, 1e-2, 1e-3, 1e-5]),
       method=st.sampled_from(["auto", "lanczos"]))  # fmt: skip
def test_the_interval_to_a_width_brackets_the_dense_norm(cfg, seed, width, method):
    """Every kind of layer (stride, dilation, groups, every padding mode, transposed): the
    interval holds the dense SVD's norm, ``value`` lies inside it, and where ``reached`` it is
    no wider than asked; where not, ``note`` says why and names the tight certificate."""
    w = cfg.weight(generator=torch.Generator().manual_seed(seed))
    op = _op(cfg, w)
    assume(min(op.shape) >= 1)
    true = torch.linalg.svdvals(dense(cfg, w))[0].item()
    r = operator_norm(op, width=width, method=method)
    assert r.width == width and r.tol == 0.0
    assert r.lower <= true * (1 + 1e-12) + 1e-300 and true <= r.upper * (1 + 1e-12)
    assert r.lower <= r.value <= r.upper
    if r.method in ("fft", "dense"):  # exact: the rounding interval, any width above it
        assert r.reached and r.upper - r.lower <= max(width * r.value, 2.1e-12 * max(1, r.value))
    elif r.reached:
        assert r.upper <= r.lower * (1 + width) * (1 + 1e-12) and not r.note
    else:  # the value has settled all the same: within the width below the norm
        assert r.upper > r.lower * (1 + width) and "certificate='tight'" in r.note
        assert r.value >= true * (1 - width)
    assert r.converged == r.reached


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 2), channels=st.integers(1, 4), kernel=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), groups=st.integers(1, 2),
       transposed=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_large_grids_need_no_lanczos(n, channels, kernel, stride, dilation, groups, transposed,
                                     seed):  # fmt: skip
    """On a grid wide against the kernel, the windowed top vector of the enclosing circular
    convolution reaches a 5% width by itself (its gap falls like (span / N)^2), for stride,
    dilation, groups and transposed layers alike, and its interval holds ARPACK's norm."""
    size = {1: 600, 2: 64}[n]
    c = channels * groups
    gen = torch.Generator().manual_seed(seed)
    lead = (c, c // groups)  # (C_out, C_in/g), or (C_in, C_out/g) transposed: alike here
    w = torch.randn(*lead, *(kernel,) * n, dtype=torch.float64, generator=gen)
    pad = dilation * (kernel - 1) // 2
    op = ConvOperator(w, (size,) * n, stride=stride, dilation=dilation, groups=groups,
                      padding=pad, transposed=transposed)  # fmt: skip
    r = operator_norm(op, width=5e-2, method="lanczos")
    assert r.reached and r.method == "window"
    true = _arpack_norm(op)
    assert r.lower <= true * (1 + 1e-10) and true <= r.upper * (1 + 1e-12)


def test_a_wider_width_takes_fewer_products():
    """Cost falls as the width grows: the products of W (counted) for widths 1e-2 and 1e-3 and
    for the value to the default tol; each interval reached and holding the norm."""
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    op = ConvOperator(w, (48, 48), padding=1)
    true = _arpack_norm(op)
    counts = []
    original = ConvOperator._apply
    for kw in ({"width": 1e-2}, {"width": 1e-3}, {"tol": 1e-7}):
        calls = []

        def counted(self, batch, calls=calls):
            calls.append(batch.shape[0])
            return original(self, batch)

        ConvOperator._apply = counted
        try:
            r = operator_norm(op, method="lanczos", **kw)
        finally:
            ConvOperator._apply = original
        assert r.reached and r.lower <= true * (1 + 1e-10) and true <= r.upper
        counts.append(sum(calls))
    assert counts[0] < counts[1] < counts[2]


def test_a_width_out_of_the_circular_certificates_reach_says_so():
    """Many channels on a small grid: the circular end lies far above the norm; the result
    says the width was not reached, and the tight certificate reaches it."""
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    r = operator_norm(w, (4, 4), padding=1, width=1e-4, method="lanczos")
    assert not r.reached and not r.converged and r.upper / r.lower - 1 > 1e-4
    assert "not reached" in r.note and "certificate='tight'" in r.note
    true = torch.linalg.svdvals(ConvOperator(w, (4, 4), padding=1).to_dense())[0].item()
    assert r.lower <= true * (1 + 1e-12) and true <= r.upper
    pytest.importorskip("cvxopt")
    tight = operator_norm(w, (4, 4), padding=1, width=1e-4, method="lanczos",
                          certificate="tight")  # fmt: skip
    assert tight.reached and tight.upper / tight.lower - 1 <= 1e-4
    assert tight.lower <= true * (1 + 1e-12) and true <= tight.upper


def test_reflect_padding_says_why_the_circular_end_is_wide():
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    r = operator_norm(w, (30, 30), padding=1, padding_mode="reflect", width=1e-3,
                      method="lanczos")  # fmt: skip
    assert not r.reached and "padding's copies" in r.note
    true = torch.linalg.svdvals(
        ConvOperator(w, (30, 30), padding=1, padding_mode="reflect").to_dense()
    )[0].item()
    assert r.lower <= true * (1 + 1e-12) and true <= r.upper


@pytest.mark.parametrize("width", [0, -1e-3, 1, 2.5, float("nan"), float("inf"), "1e-3", True])
def test_a_bad_width_is_refused(width):
    w = torch.randn(2, 2, 3, dtype=torch.float64)
    with pytest.raises(ConvMatError, match=r"width must be a number with 0 < width < 1"):
        operator_norm(w, 8, width=width)
    with pytest.raises(ConvMatError, match=r"width must be a number"):
        singular_values(w, 8, k=1, width=width)


def test_tol_and_width_together_are_refused():
    with pytest.raises(ConvMatError, match=r"give tol .* or width .*, not both"):
        operator_norm(torch.randn(2, 2, 3, dtype=torch.float64), 8, tol=1e-3, width=1e-3)


def test_width_without_k_is_refused():
    with pytest.raises(ConvMatError, match=r"width applies to the top k"):
        singular_values(torch.randn(2, 2, 3, dtype=torch.float64), 8, width=1e-3)


@pytest.mark.parametrize("function", [operator_norm, singular_values])
def test_an_unknown_keyword_names_itself_and_the_allowed_ones(function):
    with pytest.raises(ConvMatError, match=r"unexpected keyword argument 'strides'.*width.*"
                       r"stride, padding"):  # fmt: skip
        function(torch.randn(2, 2, 3, dtype=torch.float64), 8, strides=2)


@settings(deadline=None, max_examples=30)
@given(cfg=conv_configs(dims=(1, 2)), seed=st.integers(0, 2**16))
def test_the_top_singular_value_to_a_width(cfg, seed):
    """``singular_values(k=1, width=)`` lies within the width below the dense SVD's."""
    w = cfg.weight(generator=torch.Generator().manual_seed(seed))
    op = _op(cfg, w)
    assume(min(op.shape) >= 3)
    true = torch.linalg.svdvals(dense(cfg, w))[0].item()
    value = singular_values(op, k=1, width=1e-2, method="lanczos")
    r = operator_norm(op, width=1e-2, method="lanczos")
    assert value.shape == (1,) and value.item() <= true * (1 + 1e-12)
    if r.reached:
        assert value.item() >= true / (1 + 1e-2)


# -- the certificate and the windowed vector ------------------------------------------------------
@settings(deadline=None, max_examples=60)
@given(n=st.sampled_from([3, 8, 40, 100, 150, 260]), lift=st.floats(-1e-3, 1e-3),
       precision=st.sampled_from([torch.complex64, torch.complex128]), seed=st.integers(0, 2**16),
       spread=st.sampled_from([1.0, 1e-3, 1e3]))  # fmt: skip
def test_a_cholesky_proof_never_claims_a_level_below_the_largest_eigenvalue(
    n, lift, precision, seed, spread
):
    """The Cholesky test with its rounding bounded, on Hermitian matrices whose largest
    eigenvalue is known (exact unitary similarity in float64): a level below it is never
    proven, in either precision; a level well above it is."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, dtype=torch.complex128, generator=gen)
    Q, _ = torch.linalg.qr(X)
    eigen = torch.rand(n, dtype=torch.float64, generator=gen) * spread
    eigen[0] = spread  # the largest
    G = (Q * eigen.to(Q.dtype)) @ Q.mH
    G = (G + G.mH) / 2
    top = float(torch.linalg.eigvalsh(G)[-1])
    level = top * (1 + lift)
    proven = torus._psd_proof(G.to(precision)[None].clone(), level, 0.0)
    unit = 2.0**-24 if precision == torch.complex64 else 2.0**-53
    if level < top * (1 - 8 * unit):  # below by more than G's own cast
        assert not bool(proven[0])
    if lift >= 4 * torus._rounding(n, precision) * n + 1e-6:
        assert bool(proven[0])


def _shifted_grams(n: int, batch: int, precision: torch.dtype, seed: int, extra: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(S, above)``: ``s I - G`` for random Gram matrices ``G`` (``n x n``, of ``n + extra``
    columns) with ``s`` 1e-3 above their largest eigenvalue where ``above``, 1e-3 below
    elsewhere (far beyond rounding), in ``precision``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, n, n + extra, dtype=torch.complex128, generator=gen)
    G = X @ X.mH
    top = torch.linalg.eigvalsh(G)[:, -1]
    above = torch.rand(batch, generator=gen) < 0.5
    shift = top * torch.where(above, 1 + 1e-3, 1 - 1e-3)
    return (shift[:, None, None] * torch.eye(n, dtype=torch.float64) - G).to(precision), above


@settings(deadline=None, max_examples=20)
@given(n=st.sampled_from([96, 130, 200, 257]), batch=st.integers(1, 6),
       precision=st.sampled_from([torch.complex64, torch.complex128]), seed=st.integers(0, 2**16))  # fmt: skip
def test_the_blocked_cholesky_completes_where_lapacks_does(n, batch, precision, seed):
    """Wide batches are factorised by blocks on the CPU: on Hermitian matrices shifted just
    above or below their largest eigenvalue (1e-3 either way, far beyond rounding), it
    completes exactly where LAPACK's factorisation does and where the shift is above."""
    S, above = _shifted_grams(n, batch, precision, seed, extra=7)
    expected = torch.linalg.cholesky_ex(S).info == 0
    completes = torus._cholesky_completes(S.clone())
    assert completes.tolist() == expected.tolist() == above.tolist()


@settings(deadline=None, max_examples=15)
@given(n=st.sampled_from([24, 64, 100]), batch=st.integers(2, 40), threads=st.integers(1, 3),
       precision=st.sampled_from([torch.complex64, torch.complex128]), seed=st.integers(0, 2**16))  # fmt: skip
def test_the_batch_split_between_threads_answers_as_lapack(n, batch, threads, precision, seed):
    """On the CPU a batch is split between threads of one core each: every matrix's answer is
    LAPACK's own (shifted 1e-3 above or below its largest eigenvalue), in order, and torch's
    thread count is as it was."""
    S, above = _shifted_grams(n, batch, precision, seed, extra=3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = torus._threads(batch, batch * n**3, S.device)
        completes = torus._cholesky_completes(S.clone())
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert split == (min(threads, batch) if batch * n**3 >= torus._SPLIT_WORK else 1)
    assert completes.tolist() == above.tolist()
    assert completes.tolist() == (torch.linalg.cholesky_ex(S).info == 0).tolist()


@pytest.mark.parametrize("precision", [torch.complex64, torch.complex128])
def test_a_blocked_cholesky_failure_in_the_first_block_is_kept(precision):
    """A negative pivot in the first block (the rest positive definite) fails that matrix
    alone; a NaN fails its own matrix and no other; both as LAPACK's factorisation says."""
    n = 200
    S = torch.eye(n, dtype=precision).repeat(4, 1, 1) * 2
    S[1, 0, 0] = -1.0
    S[2, 5, 5] = float("nan")
    expected = torch.linalg.cholesky_ex(S).info == 0
    completes = torus._cholesky_completes(S.clone())
    assert completes.tolist() == expected.tolist() == [True, False, False, True]


@settings(deadline=None, max_examples=40)
@given(cfg=st.one_of(conv_configs(dims=(1, 2)), conv_transpose_configs(dims=(1, 2))),
       seed=st.integers(0, 2**16), room=st.sampled_from([1e-10, 1e-4, 1e-2]),
       sampled=st.booleans(), again=st.sampled_from([None, 1e-10, 1e-4, 1e-2]),
       split=st.booleans())  # fmt: skip
def test_the_enclosing_torus_is_certified_against_its_dense_circulant(cfg, seed, room, sampled,
                                                                     again, split):  # fmt: skip
    """``torus_top``'s upper end lies above every frequency's largest singular value (the
    spectrum by FFT, decomposed in full), within ``room``; its value is the largest. Also
    where only a regular sample of the frequencies is ranked first (``sampled``: large
    grids of narrow Gram matrices), forced here on small ones: there the value may be
    another frequency's, within ``room`` of the largest. Also certified again with another
    room (``again``) on the same Gram matrices, their first ranking reused. Also with the
    tests split between two threads and formed a few matrices at a time (``split``: large
    batches), forced here on small ones."""
    w = cfg.weight(generator=torch.Generator().manual_seed(seed))
    geo = _op(cfg, w).geometry.matching_conv
    size = torus.enclosing_torus(geo)
    weight = _op(cfg, w).weight
    M = torus.torus_spectrum(weight, geo, (0,) * geo.ndim, size, top_only=True).flatten(0, 1)
    exact = float(torch.linalg.svdvals(M).max()) if M.numel() else 0.0
    grams = torus.TorusGrams(weight, geo, (0,) * geo.ndim, size)
    threads = torch.get_num_threads()
    with (
        mock.patch.object(torus, "_RANK_ALL_COUNT", 0 if sampled else torus._RANK_ALL_COUNT),
        mock.patch.object(torus, "_SPLIT_WORK", 0 if split else torus._SPLIT_WORK),
        mock.patch.object(torus, "_CACHED_BYTES", 2**11 if split else torus._CACHED_BYTES),
    ):
        torch.set_num_threads(2 if split else threads)
        try:
            if sampled:
                assert torus._sample(grams).numel() < grams.count or grams.freqs == 1
            top = torus.torus_top(grams, room)
            if again is not None:
                assert bool((grams.ranking > -math.inf).any()) or grams.count == 0
                top, room = torus.torus_top(grams, again), again
            assert torch.get_num_threads() == (2 if split else threads)
        finally:
            torch.set_num_threads(threads)
    assert exact <= top.upper * (1 + 1e-14) + 1e-300
    assert top.upper <= max(exact, 1e-300) * math.sqrt(1 + 4 * room + 1e-9) + 1e-150
    if sampled:  # the top may pass its test below the level set by a frequency found first
        assert exact <= top.value * math.sqrt(1 + room) * (1 + 1e-9) + 1e-300
        assert top.value <= exact * (1 + 1e-9) + 1e-300
    else:
        assert abs(top.value - exact) <= 1e-9 * max(exact, 1e-300)


@given(cfg=conv_configs(dims=(1, 2)), seed=st.integers(0, 2**16),
       room=st.sampled_from([1e-10, 1e-4, 1e-2]))  # fmt: skip
@settings(deadline=None, max_examples=40)
def test_gram_matrices_scaled_for_a_folded_batchnorm_are_the_scaled_weights(cfg, seed, room):
    """``TorusGrams.scaled`` (a BatchNorm folded into the layer: output channel ``c`` times
    ``scale[c]``, of either sign): each Gram matrix lies within the bound its ``form_error``
    states (plus the fresh one's) of the matrix formed from the scaled weight, in both
    precisions, and its certificate brackets the scaled weight's circular norm (the spectrum
    by FFT, decomposed in full) within ``room``. Where the Gram matrices are ``M^H M`` (the
    input side, the scale inside them) there is nothing to scale: ``None``."""
    gen = torch.Generator().manual_seed(seed)
    op = _op(cfg, cfg.weight(generator=gen))
    geo, weight = op.geometry.matching_conv, op.weight
    out = weight.shape[0]
    scale = (torch.rand(out, dtype=torch.float64, generator=gen) * 3 + 0.1) * torch.where(
        torch.rand(out, generator=gen) < 0.5, -1.0, 1.0).double()  # fmt: skip
    size, before = torus.enclosing_torus(geo), (0,) * geo.ndim
    grams = torus.TorusGrams(weight, geo, before, size)
    scaled = grams.scaled(scale)
    folded = weight * scale.view(-1, *[1] * (weight.dim() - 1))
    if grams.rows > grams.cols:
        assert scaled is None
    else:
        fresh = torus.TorusGrams(folded, geo, before, size)
        every = torch.arange(fresh.count)
        assert scaled is not None and scaled.count == fresh.count
        for dtype in (torch.complex128, torch.complex64):
            gap = torch.linalg.matrix_norm(scaled.at(every, dtype) - fresh.at(every, dtype), 2)
            bound = scaled.form_error(dtype) + fresh.form_error(dtype)
            assert float(gap.max()) <= bound * (1 + 1e-9) + 1e-300
        M = torus.torus_spectrum(folded, geo, before, size, top_only=True).flatten(0, 1)
        exact = float(torch.linalg.svdvals(M).max()) if M.numel() else 0.0
        top = torus.torus_top(scaled, room)
        assert exact <= top.upper * (1 + 1e-14) + 1e-300
        assert top.upper <= max(exact, 1e-300) * math.sqrt(1 + 4 * room + 1e-9) + 1e-150
        assert bool((grams.ranking == -math.inf).all()) or grams.count == 0  # not shared


def test_the_gram_matrices_kept_for_a_folded_layer_are_let_go_once_used():
    """Within ``keeping_grams`` a layer's Gram matrices are kept with its weight and geometry;
    ``folded_grams`` finds them by value (a copy of the weight matches), once; another weight
    or geometry, or nothing kept (outside, or a budget of 0), gives ``None``."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, 3, 3, dtype=torch.float64, generator=gen)
    geo = ConvOperator(w, (9, 9), padding=1).geometry
    other = ConvOperator(w, (10, 9), padding=1).geometry
    scale = torch.rand(6, dtype=torch.float64, generator=gen) + 0.5
    torus.enclosing_norm(w, geo)
    assert torus.folded_grams(w, scale, geo) is None  # outside: nothing kept
    with torus.keeping_grams():
        torus.enclosing_norm(w, geo)
        assert torus.folded_grams(w + 1e-3, scale, geo) is None
        assert torus.folded_grams(w, scale, other) is None
        assert torus.folded_grams(w.clone(), scale, geo) is not None
        assert torus.folded_grams(w, scale, geo) is None  # let go
    with mock.patch.object(torus, "_KEPT_BYTES", 0), torus.keeping_grams():
        torus.enclosing_norm(w, geo)
        assert torus.folded_grams(w, scale, geo) is None


@pytest.mark.parametrize("power", [0, 600, -600, 1000, 1023])
def test_the_torus_of_weights_near_float64s_limits_scales_exactly(power):
    """A weight scaled by 2^power (its Gram matrices, squaring it, would overflow or vanish
    in float64): the certificate is the unscaled one times 2^power, bit for bit (a loop that
    never settled on overflowed Gram matrices hung a model's report before); at 2^1023 the
    largest entry is 1.5 * 2^1023, the norms beyond float64 (inf)."""
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = w / w.abs().max() * 1.5
    geo = ConvOperator(w, (9, 7), padding=1).geometry
    size = torus.enclosing_torus(geo)
    plain = torus.torus_top(torus.TorusGrams(w, geo, (0, 0), size), 1e-4)
    scaled = torus.torus_top(torus.TorusGrams(w * 2.0**power, geo, (0, 0), size), 1e-4)
    assert scaled.upper == plain.upper * 2.0**power
    assert scaled.value == plain.value * 2.0**power and scaled.index == plain.index
    if power <= 1000:  # below: the interval of a finite norm
        r = operator_norm(w * 2.0**power, (9, 7), padding=1, method="fft", padding_mode="circular")
        circular = ConvOperator(w, (9, 7), padding=1, padding_mode="circular")
        true = float(torch.linalg.matrix_norm(circular.to_dense(), ord=2))
        assert r.lower <= math.ldexp(true, power) * (1 + 1e-12) <= r.upper * (1 + 2e-12)


@pytest.mark.parametrize("kernel, stride", [((2, 2), (2, 2)), ((1, 3), (1, 1)), ((3, 1), (1, 2))])
def test_axes_where_every_tap_has_one_shift_keep_one_frequency(kernel, stride):
    """Kernel 1 along an axis, or kernel = stride (one tap per phase): the Gram matrices do not
    vary along it, one frequency stands for all, and the certificate is still the circulant's
    norm (its spectrum decomposed in full) and above the layer's."""
    w = torch.randn(6, 4, *kernel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = ConvOperator(w, (12, 10), stride=stride)
    geo = op.geometry
    size = torus.enclosing_torus(geo)
    grams = torus.TorusGrams(w, geo, (0, 0), size)
    assert [n == 1 for n in grams.freq_shape] == [k in (1, s) for k, s in zip(kernel, stride)]
    M = torus.torus_spectrum(w, geo, (0, 0), size, top_only=True).flatten(0, 1)
    exact = float(torch.linalg.svdvals(M).max())
    top = torus.torus_top(grams)
    assert exact <= top.upper * (1 + 1e-14) and abs(top.value - exact) <= 1e-9 * exact
    true = float(torch.linalg.matrix_norm(op.to_dense(), ord=2))
    r = operator_norm(op, width=1e-3, method="lanczos")
    assert r.lower <= true * (1 + 1e-12) and true <= r.upper


@settings(deadline=None, max_examples=40)
@given(cfg=st.one_of(conv_configs(dims=(1, 2)), conv_transpose_configs(dims=(1, 2))),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_the_windowed_vector_is_a_real_input_below_the_norm(cfg, seed):
    """The windowed vectors live on the layer's input, and their ratio ``||W x|| / ||x||``
    (computed by torch's convolution) lies below the dense SVD's norm."""
    w = cfg.weight(generator=torch.Generator().manual_seed(seed))
    op = _op(cfg, w)
    geo = op.geometry
    enclosing = torus.enclosing_norm(op.weight, geo.matching_conv)
    X = torus.windowed_vector(enclosing, geo.matching_conv, not geo.transposed)
    assert X.shape == (2, *op.in_shape) and X.dtype == torch.float64
    W = dense(cfg, w)
    flat = X.reshape(2, -1)
    norms = flat.norm(dim=1)
    assume(bool((norms > 0).any()))
    ratio = ((W @ flat.T).norm(dim=0) / norms.clamp_min(1e-300)).max().item()
    assert ratio <= torch.linalg.svdvals(W)[0].item() * (1 + 1e-12)
    # The wave carries the top eigenvector torus_top found (not decomposed again): a unit
    # eigenvector of its frequency's Gram matrix, for the value it reports.
    top, grams = enclosing.top, enclosing.grams
    if top.vector is not None:
        G = grams.at(torch.tensor([top.index]))[0]
        lam = (top.value / grams.scale) ** 2
        assert abs(float(top.vector.norm()) - 1) <= 1e-12
        assert float((G @ top.vector - lam * top.vector).norm()) <= 1e-8 * max(lam, 1e-300)


def test_the_method_literal_is_the_registrys():
    """One record per spectral method: the ``Method`` Literal, ``METHODS`` and the validation
    all follow ``REGISTRY``."""
    from typing import get_args

    from convmat.analysis import spectral

    assert get_args(spectral.Method) == ("auto", *spectral.REGISTRY)
    assert tuple(spectral.REGISTRY) == spectral.METHODS
    for name, record in spectral.REGISTRY.items():
        assert record.name == name and record.summary
    with pytest.raises(ConvMatError, match=r"method must be one of \('auto', 'fft', 'dense'"):
        operator_norm(torch.randn(2, 2, 3, dtype=torch.float64), 8, method="svd")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_interval_to_a_width_on_cuda_equals_the_cpus():
    """Every step on the weight's device: the torus, its certificate, the windowed vector and
    Lanczos run on CUDA and give the CPU's interval."""
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for size, width in (((64, 64), 1e-2), ((6, 6), 1e-3)):
        cpu = operator_norm(w, size, padding=1, width=width, method="lanczos")
        gpu = operator_norm(w.cuda(), size, padding=1, width=width, method="lanczos")
        assert gpu.reached == cpu.reached and gpu.method == cpu.method
        assert gpu.upper == pytest.approx(cpu.upper, rel=1e-9)
        assert gpu.lower == pytest.approx(cpu.lower, rel=width)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), channels=st.sampled_from([1, 2, 3, 8, 24]),
       size=st.sampled_from([(6, 5), (9, 9)]))  # fmt: skip
def test_the_ranking_estimates_lie_below_each_largest_eigenvalue(seed, channels, size):
    """The ranking's estimates (a few single-precision Lanczos steps) are Ritz values: at most
    each frequency's largest eigenvalue (to single precision's rounding), and the frequency
    ranked first holds a largest eigenvalue within a few percent of the maximum; also on Gram
    matrices narrower than the steps (the Krylov space exhausted: a step past it once divided
    rounding by rounding, and eigh failed on the tridiagonal matrix)."""
    w = torch.randn(channels, channels, 3, 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
    geo = ConvOperator(w, size, padding=1).geometry
    grams = torus.TorusGrams(w, geo, (0, 0), torus.enclosing_torus(geo))
    index = torch.arange(grams.count)
    estimates = torus._estimates(grams, index)
    largest = torch.linalg.eigvalsh(grams.at(index))[:, -1]
    # (single precision's rounding is relative to the largest Gram matrix, not to each)
    assert bool((estimates <= largest + 1e-5 * float(largest.max()) + 1e-12).all())
    assert float(largest[int(torch.argmax(estimates))]) >= 0.97 * float(largest.max())


@pytest.mark.parametrize("side", [1, 2, 3])
def test_the_ranking_steps_stop_where_the_krylov_space_is_exhausted(side):
    """On Gram matrices narrower than the ranking's steps, the Lanczos steps past the width are
    zeros (not rounding divided by rounding: in U-Net with 2 channels that overflowed, and
    eigh failed), and the tridiagonal matrix's largest eigenvalue is the matrix's."""
    gen = torch.Generator().manual_seed(side)
    X = torch.randn(5, side, side + 1, dtype=torch.complex64, generator=gen)
    G = X @ X.mH
    G = G / G.diagonal(dim1=-2, dim2=-1).real.amax()
    v = torch.randn(5, side, 1, dtype=torch.complex64, generator=gen)
    steps = torus._lanczos(G, v, 6).double()
    assert bool(steps[:, side:].eq(0).all()) and bool(steps.isfinite().all())
    a, b = steps[..., 0], steps[..., 1:, 1]
    T = torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
    expected = torch.linalg.eigvalsh(G.to(torch.complex128))[:, -1]
    torch.testing.assert_close(torch.linalg.eigvalsh(T)[:, -1], expected, rtol=1e-5, atol=0)


@given(seed=st.integers(0, 2**16), channels=st.integers(1, 6))
def test_ranking_one_matrix_at_a_time_equals_the_batched_steps(seed, channels):
    """Wide Gram matrices are ranked one matrix at a time on the CPU (forced here on small
    ones): the same Lanczos steps from the same starts as the batched ones, to single
    precision's rounding."""
    w = torch.randn(channels, channels, 3, 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
    geo = ConvOperator(w, (6, 5), padding=1).geometry
    grams = torus.TorusGrams(w, geo, (0, 0), torus.enclosing_torus(geo))
    index = torch.arange(grams.count)
    batched = torus._estimates(grams, index)
    with mock.patch.object(torus, "_SINGLE_RANK_FROM", 0):
        single = torus._estimates(grams, index)
    assert single.shape == batched.shape == (grams.count,)
    assert torch.allclose(single, batched, rtol=1e-4, atol=1e-30)


@settings(deadline=None, max_examples=60)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), groups=st.integers(1, 3),
       reach=st.integers(0, 4), data=st.data())  # fmt: skip
def test_the_neighbourhoods_ranked_around_a_sample_are_every_near_frequency(shape, groups, reach,
                                                                           data):  # fmt: skip
    """``_around``: every frequency of the same group within ``reach`` steps along each axis,
    the axes but the last periodic (full spectra), the last not (half the spectrum), each
    once, counted by brute force over the whole grid."""
    freqs = math.prod(shape)
    coords = torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape))
    grams = types.SimpleNamespace(freq_shape=tuple(shape), freqs=freqs,
                                  coords=lambda i: (i // freqs, coords[i % freqs]))  # fmt: skip
    index = torch.tensor(data.draw(st.lists(st.integers(0, groups * freqs - 1), min_size=1,
                                            max_size=5)))  # fmt: skip
    expected = set()
    for i in index.tolist():
        g, c = divmod(i, freqs)
        for j in range(freqs):
            gap = (coords[j] - coords[c]).abs()
            around = torch.minimum(gap[:-1], torch.tensor(shape[:-1]) - gap[:-1])
            if bool((around <= reach).all()) and int(gap[-1]) <= reach:
                expected.add(g * freqs + j)
    found = torus._around(grams, index, reach).tolist()
    assert found == sorted(expected)
