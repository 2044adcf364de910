"""CHOLMOD's supernodal Cholesky, called directly: the library the ``cvxopt`` wheel ships.

The tight certificate (:mod:`convmat.analysis.certify`) factors matrices with up to ~10^8
entries. Building a cvxopt matrix from triplets costs ~0.3 us an entry, longer than the
factorisation on large layers, so the library is called through ctypes on numpy arrays.

The structures below are CHOLMOD 3's (SuiteSparse 4.x/5.x, ``cholmod_core.h``), declared field
by field so that the offsets follow from the declarations. They are checked against the library
when it is first loaded (:func:`library`): the defaults ``cholmod_l_start`` writes into
``cholmod_common``, then a small matrix factored and read back through ``cholmod_factor`` (the
factor times its transpose gives the matrix back in the order the factor reports, and a matrix
that is not positive definite fails at the column where it must). A library that differs is
refused with a :class:`ConvMatError` saying what differed; :func:`factor` then goes through
cvxopt's own interface (:func:`factor_cvxopt`: slower, and without the factor's structure).
"""

from __future__ import annotations

import ctypes
import glob
import os
import time
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np

from .._errors import ConvMatError

__all__ = [
    "Cholmod",
    "Factorization",
    "SupernodalFactor",
    "factor",
    "factor_cvxopt",
    "library",
    "load_cvxopt",
]

# CHOLMOD's constants (cholmod_core.h, cholmod_cholesky.h).
_NATURAL, _GIVEN, _AMD, _METIS, _NESDIS = 0, 1, 2, 3, 4  # orderings
_AUTO, _SUPERNODAL = 1, 2  # Common->supernodal
_LONG, _REAL, _DOUBLE = 2, 1, 0  # itype, xtype, dtype
_OK, _NOT_POSDEF = 0, 1  # Common->status
_MAXMETHODS = 9
_COMMON_BYTES = 1 << 16  # room for all of cholmod_common (about 2.6 KB in CHOLMOD 3)


def load_cvxopt() -> Any:
    """cvxopt with its CHOLMOD module loaded, or :class:`ConvMatError` saying how to install it.

    >>> load_cvxopt().cholmod.__name__
    'cvxopt.cholmod'
    """
    try:
        import cvxopt  # type: ignore[import-untyped]
        import cvxopt.cholmod  # type: ignore[import-untyped]
    except ImportError:
        raise ConvMatError(
            'the tight certificate needs cvxopt (CHOLMOD): pip install "convmat[certify]"'
        ) from None
    return cvxopt


class _Method(ctypes.Structure):
    _fields_ = [
        ("lnz", ctypes.c_double), ("fl", ctypes.c_double), ("prune_dense", ctypes.c_double),
        ("prune_dense2", ctypes.c_double), ("nd_oksep", ctypes.c_double),
        ("other_1", ctypes.c_double * 4), ("nd_small", ctypes.c_size_t),
        ("other_2", ctypes.c_size_t * 4), ("aggressive", ctypes.c_int),
        ("order_for_lu", ctypes.c_int), ("nd_compress", ctypes.c_int), ("nd_camd", ctypes.c_int),
        ("nd_components", ctypes.c_int), ("ordering", ctypes.c_int),
        ("other_3", ctypes.c_size_t * 4),
    ]  # fmt: skip


class _Common(ctypes.Structure):
    """``cholmod_common`` up to ``status`` (the rest is never read; the buffer holds it all)."""

    _fields_ = [
        ("dbound", ctypes.c_double), ("grow0", ctypes.c_double), ("grow1", ctypes.c_double),
        ("grow2", ctypes.c_size_t), ("maxrank", ctypes.c_size_t),
        ("supernodal_switch", ctypes.c_double), ("supernodal", ctypes.c_int),
        ("final_asis", ctypes.c_int), ("final_super", ctypes.c_int), ("final_ll", ctypes.c_int),
        ("final_pack", ctypes.c_int), ("final_monotonic", ctypes.c_int),
        ("final_resymbol", ctypes.c_int), ("zrelax", ctypes.c_double * 3),
        ("nrelax", ctypes.c_size_t * 3), ("prefer_zomplex", ctypes.c_int),
        ("prefer_upper", ctypes.c_int), ("quick_return_if_not_posdef", ctypes.c_int),
        ("prefer_binary", ctypes.c_int), ("print", ctypes.c_int), ("precise", ctypes.c_int),
        ("try_catch", ctypes.c_int), ("error_handler", ctypes.c_void_p),
        ("nmethods", ctypes.c_int), ("current", ctypes.c_int), ("selected", ctypes.c_int),
        ("method", _Method * (_MAXMETHODS + 1)), ("postorder", ctypes.c_int),
        ("default_nesdis", ctypes.c_int), ("metis_memory", ctypes.c_double),
        ("metis_dswitch", ctypes.c_double), ("metis_nswitch", ctypes.c_size_t),
        ("nrow", ctypes.c_size_t), ("mark", ctypes.c_int64), ("iworksize", ctypes.c_size_t),
        ("xworksize", ctypes.c_size_t), ("Flag", ctypes.c_void_p), ("Head", ctypes.c_void_p),
        ("Xwork", ctypes.c_void_p), ("Iwork", ctypes.c_void_p), ("itype", ctypes.c_int),
        ("dtype", ctypes.c_int), ("no_workspace_reallocate", ctypes.c_int),
        ("status", ctypes.c_int),
    ]  # fmt: skip


class _Sparse(ctypes.Structure):
    _fields_ = [
        ("nrow", ctypes.c_size_t), ("ncol", ctypes.c_size_t), ("nzmax", ctypes.c_size_t),
        ("p", ctypes.c_void_p), ("i", ctypes.c_void_p), ("nz", ctypes.c_void_p),
        ("x", ctypes.c_void_p), ("z", ctypes.c_void_p), ("stype", ctypes.c_int),
        ("itype", ctypes.c_int), ("xtype", ctypes.c_int), ("dtype", ctypes.c_int),
        ("sorted", ctypes.c_int), ("packed", ctypes.c_int),
    ]  # fmt: skip


class _Factor(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_size_t), ("minor", ctypes.c_size_t), ("Perm", ctypes.c_void_p),
        ("ColCount", ctypes.c_void_p), ("IPerm", ctypes.c_void_p), ("nzmax", ctypes.c_size_t),
        ("p", ctypes.c_void_p), ("i", ctypes.c_void_p), ("x", ctypes.c_void_p),
        ("z", ctypes.c_void_p), ("nz", ctypes.c_void_p), ("next", ctypes.c_void_p),
        ("prev", ctypes.c_void_p), ("nsuper", ctypes.c_size_t), ("ssize", ctypes.c_size_t),
        ("xsize", ctypes.c_size_t), ("maxcsize", ctypes.c_size_t), ("maxesize", ctypes.c_size_t),
        ("super", ctypes.c_void_p), ("pi", ctypes.c_void_p), ("px", ctypes.c_void_p),
        ("s", ctypes.c_void_p), ("ordering", ctypes.c_int), ("is_ll", ctypes.c_int),
        ("is_super", ctypes.c_int), ("is_monotonic", ctypes.c_int), ("itype", ctypes.c_int),
        ("xtype", ctypes.c_int), ("dtype", ctypes.c_int),
    ]  # fmt: skip


#: What ``cholmod_l_start`` writes (CHOLMOD 3's ``cholmod_l_defaults``), field by field.
_DEFAULTS: dict[str, Any] = {
    "dbound": 0.0, "grow0": 1.2, "grow1": 1.2, "grow2": 5, "maxrank": 8,
    "supernodal_switch": 40.0, "supernodal": _AUTO, "final_asis": 1, "final_super": 1,
    "final_ll": 0, "final_pack": 1, "zrelax": [0.8, 0.1, 0.05], "nrelax": [4, 16, 48],
    "prefer_upper": 1, "print": 3, "try_catch": 0, "error_handler": None, "nmethods": 0,
    "orderings": [_GIVEN, _AMD, _METIS, _NESDIS, _NATURAL], "postorder": 1, "itype": _LONG,
    "dtype": _DOUBLE, "status": _OK,
}  # fmt: skip


def _read_defaults(common: _Common) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in _DEFAULTS:
        if name == "orderings":
            found[name] = [common.method[m].ordering for m in range(5)]
        elif name in ("zrelax", "nrelax"):
            found[name] = list(getattr(common, name))
        else:
            found[name] = getattr(common, name)
    return found


def _array(address: int | None, length: int, dtype: type) -> np.ndarray:
    """A copy of ``length`` entries at ``address`` (int64 or float64)."""
    if length == 0:
        return np.zeros(0, dtype=dtype)
    if not address:
        raise ConvMatError("CHOLMOD returned a factor without the arrays it must hold")
    kind = ctypes.c_int64 if dtype is np.int64 else ctypes.c_double
    view = np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(kind)), (length,))
    copied: np.ndarray = view.copy()
    return copied


class SupernodalFactor:
    """A supernodal ``L L^T`` factor held by CHOLMOD; a context manager that frees it.

    The factor is of ``P A P^T`` with ``P`` the order :meth:`perm` reports (the given order
    after CHOLMOD's postordering, an equivalent order). Columns and rows of :meth:`lower` and
    :attr:`failed_column` are in that order.
    """

    def __init__(self, lib: Any, common: ctypes.Array[ctypes.c_char], pointer: int) -> None:
        self._lib, self._common, self._pointer = lib, common, ctypes.c_void_p(pointer)
        self._f = _Factor.from_address(pointer)

    @property
    def failed_column(self) -> int | None:
        """The column (in the factor's order) where a pivot was not positive; None where
        every pivot was (or before the numeric factorisation)."""
        return int(self._f.minor) if self._f.minor < self._f.n else None

    @property
    def n(self) -> int:
        return int(self._f.n)

    @property
    def stored_entries(self) -> int:
        """The entries CHOLMOD stores for L (relaxed supernodes store some exact zeros)."""
        return int(self._f.xsize)

    def perm(self) -> np.ndarray:
        """``(n,)`` int64: row ``k`` of the factored matrix is row ``perm[k]`` of ``A``."""
        return _array(self._f.Perm, self.n, np.int64)

    def _supernodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per supernode: its first column (``nsuper + 1``), where its row indices start in
        ``rows`` (``nsuper + 1``) and its values in ``x`` (``nsuper + 1``), and ``rows``."""
        f = self._f
        k = int(f.nsuper)
        first, start = _array(f.super, k + 1, np.int64), _array(f.pi, k + 1, np.int64)
        return first, start, _array(f.px, k + 1, np.int64), _array(f.s, int(f.ssize), np.int64)

    def row_counts(self) -> np.ndarray:
        """``(n,)``: the entries stored in each row of L (exact zeros of relaxed supernodes
        included, so each is at least the row's count of structural non-zeros)."""
        first, start, _, rows = self._supernodes()
        # Supernode j holds columns first[j]..first[j+1]-1 and rows rows[start[j]:start[j+1]]
        # (its own columns first): the row at place p holds min(p + 1, width) entries.
        width, height = np.diff(first), np.diff(start)
        which = np.repeat(np.arange(len(width)), height)
        place = np.arange(len(rows)) - np.repeat(start[:-1], height)
        return np.bincount(
            rows, weights=np.minimum(place + 1, width[which]), minlength=self.n
        ).astype(np.int64)

    def lower(self) -> Any:
        """L as a ``scipy.sparse`` CSC matrix in the factor's order (for checks: it copies)."""
        import scipy.sparse as sp  # type: ignore[import-untyped]

        first, start, px, rows = self._supernodes()
        x = _array(self._f.x, int(self._f.xsize), np.float64)
        width, height = np.diff(first), np.diff(start)
        sizes = width * height  # each supernode's values: a column-major height x width block
        which = np.repeat(np.arange(len(width)), sizes)
        local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        col = first[which] + local // height[which]
        row = rows[start[which] + local % height[which]]
        keep = row >= col  # the block's upper part holds nothing of L
        values = x[px[which] + local][keep]
        return sp.csc_matrix((values, (row[keep], col[keep])), shape=(self.n, self.n))

    def diagonal(self) -> np.ndarray:
        """``(n,)``: L's diagonal in the factor's order (cvxopt's ``cholmod.diag``)."""
        first, start, px, _ = self._supernodes()
        x = _array(self._f.x, int(self._f.xsize), np.float64)
        width, height = np.diff(first), np.diff(start)
        which = np.repeat(np.arange(len(width)), width)
        within = np.arange(self.n) - first[which]
        diagonal: np.ndarray = x[px[which] + within * (height[which] + 1)]
        return diagonal

    def close(self) -> None:
        if self._pointer.value:
            self._lib.cholmod_l_free_factor(ctypes.byref(self._pointer), self._common)
            self._pointer = ctypes.c_void_p()
            self._lib.cholmod_l_finish(self._common)

    def __enter__(self) -> SupernodalFactor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Cholmod:
    """The CHOLMOD library at ``path``, its layout checked (see :func:`library`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        ptr = ctypes.c_void_p
        lib.cholmod_l_start.argtypes = [ptr]
        lib.cholmod_l_finish.argtypes = [ptr]
        lib.cholmod_l_analyze_p.argtypes = [ptr, ptr, ptr, ctypes.c_size_t, ptr]
        lib.cholmod_l_analyze_p.restype = ptr
        lib.cholmod_l_factorize.argtypes = [ptr, ptr, ptr]
        lib.cholmod_l_free_factor.argtypes = [ptr, ptr]
        self._lib = lib
        problem = _layout_problem(self)
        if problem is not None:
            raise ConvMatError(
                f"the CHOLMOD library {path!r} does not have the layout convmat reads "
                f"(CHOLMOD 3, SuiteSparse 4.x/5.x): {problem}"
            )

    def start(self) -> tuple[ctypes.Array[ctypes.c_char], _Common]:
        """A started ``cholmod_common`` (the caller finishes it) and its fields."""
        buffer = ctypes.create_string_buffer(_COMMON_BYTES)
        self._lib.cholmod_l_start(buffer)
        return buffer, _Common.from_buffer(buffer)

    def factor(
        self, row: np.ndarray, col: np.ndarray, values: np.ndarray, perm: np.ndarray, n: int,
        times: dict[str, float] | None = None,
    ) -> SupernodalFactor:  # fmt: skip
        """Supernodal Cholesky of the symmetric matrix whose lower triangle is ``(row, col,
        values)`` (sorted by row, then column), in the order ``perm`` (postordered).

        Returns the factor (a context manager that frees it); ``failed_column`` says where a
        pivot was not positive. ``times`` (optional) gets ``assemble`` added to, ``symbolic``
        and ``numeric`` set (seconds).

        Raises:
            ConvMatError: where CHOLMOD runs out of memory or fails otherwise.
        """
        times = {} if times is None else times
        start = time.perf_counter()
        # The lower triangle by rows is the upper triangle by columns (A is symmetric).
        colptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=n), out=colptr[1:])
        rowind = np.ascontiguousarray(col, dtype=np.int64)
        x = np.ascontiguousarray(values, dtype=np.float64)
        user = np.ascontiguousarray(perm, dtype=np.int64)
        a = _Sparse(
            n, n, len(x), colptr.ctypes.data, rowind.ctypes.data, None, x.ctypes.data, None,
            1, _LONG, _REAL, _DOUBLE, 1, 1,
        )  # fmt: skip
        buffer, common = self.start()
        common.supernodal = _SUPERNODAL
        common.nmethods = 1  # method[0]: the given order, and nothing else tried
        common.method[0].ordering = _GIVEN
        common.print = 0
        times["assemble"] = times.get("assemble", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        pointer = self._lib.cholmod_l_analyze_p(ctypes.byref(a), user.ctypes.data, None, 0, buffer)
        times["symbolic"] = time.perf_counter() - start
        if not pointer:
            status = common.status
            self._lib.cholmod_l_finish(buffer)
            raise ConvMatError(f"CHOLMOD could not analyse the matrix (status {status})")
        result = SupernodalFactor(self._lib, buffer, pointer)
        try:
            start = time.perf_counter()
            self._lib.cholmod_l_factorize(ctypes.byref(a), pointer, buffer)
            times["numeric"] = time.perf_counter() - start
            if common.status not in (_OK, _NOT_POSDEF):
                raise ConvMatError(
                    f"CHOLMOD could not factor the matrix (status {common.status}; "
                    f"-2 is out of memory)"
                )
            f = result._f
            if f.n != n or not f.is_super or not f.is_ll:
                raise ConvMatError(
                    f"unexpected CHOLMOD factor (n={f.n}, supernodal={f.is_super}, ll={f.is_ll})"
                )
        except BaseException:
            result.close()
            raise
        return result


def _known(side: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A small positive definite matrix (a 5 x 5 grid's, diagonally dominant) and an order in
    which its factor has several supernodes, each with rows below its own columns, and fill."""
    n = side * side
    grid = np.arange(n).reshape(side, side)
    a = 4.5 * np.eye(n)
    for first, second in ((grid[:, :-1], grid[:, 1:]), (grid[:-1], grid[1:])):
        a[first.ravel(), second.ravel()] = a[second.ravel(), first.ravel()] = -1.0
    return a, (np.arange(n) * 7) % n


def _lower_triplets(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row, col = np.nonzero(np.tril(a))  # row-major: sorted by row, then column
    return row, col, a[row, col]


def _layout_problem(cholmod: Cholmod) -> str | None:
    """What differs between the declared structures and the library, or None."""
    buffer, common = cholmod.start()
    found = _read_defaults(common)
    cholmod._lib.cholmod_l_finish(buffer)
    wrong = {k: v for k, v in found.items() if v != _DEFAULTS[k]}
    if wrong:
        return f"cholmod_common's defaults read {wrong}, expected {_DEFAULTS}"
    a, perm = _known()
    with cholmod.factor(*_lower_triplets(a), perm, len(a)) as f:
        # several supernodes, and rows stored below their own columns (ssize > n)
        shape = f._f.nsuper > 1 and len(a) < f._f.ssize < len(a) ** 2
        fields = (f._f.ordering, f._f.itype, f._f.xtype, f._f.dtype, shape)
        if fields != (_GIVEN, _LONG, _REAL, _DOUBLE, True):
            return f"cholmod_factor's ordering, itype, xtype, dtype, shape read {fields}"
        if f.failed_column is not None:
            return f"a positive definite matrix failed at column {f.failed_column}"
        order = f.perm()
        if sorted(order.tolist()) != list(range(len(a))):
            return f"the factor's order is not a permutation: {order.tolist()}"
        lower = f.lower().toarray()
        error = np.abs(lower @ lower.T - a[order][:, order]).max()
        if not error < 1e-12:
            return f"L L^T differs from the matrix by {error:.3g}"
        if not np.array_equal(f.diagonal(), np.diag(lower)):
            return "the diagonal read differs from L's"
        if (f.row_counts() < (lower != 0).sum(1)).any():
            return "the row counts read are below L's"
    # Not positive definite at one diagonal entry: every earlier pivot is of a principal
    # submatrix of the matrix above, so the first to fail is that entry's own.
    bad = 5
    a[bad, bad] = -1.0
    with cholmod.factor(*_lower_triplets(a), perm, len(a)) as f:
        expected = int(np.flatnonzero(f.perm() == bad)[0])
        if f.failed_column != expected:
            return f"an indefinite matrix failed at column {f.failed_column}, not {expected}"
    return None


_LIBRARY: list[Cholmod | ConvMatError] = []


def library() -> Cholmod:
    """CHOLMOD as shipped with cvxopt, its layout checked once (the outcome is kept).

    Raises:
        ConvMatError: cvxopt missing, its CHOLMOD not found, or a layout that differs from the
            one declared here (saying what differed).
    """
    if not _LIBRARY:
        cvxopt = load_cvxopt()  # cvxopt.cholmod loads the libraries CHOLMOD depends on
        folder = os.path.join(os.path.dirname(cvxopt.__file__), os.pardir, "cvxopt.libs")
        found = sorted(glob.glob(os.path.join(folder, "libcholmod*.so*")))
        outcome: Cholmod | ConvMatError
        try:
            if not found:
                raise ConvMatError(f"no CHOLMOD library beside cvxopt (looked in {folder!r})")
            outcome = Cholmod(found[0])
        except ConvMatError as err:
            outcome = err
        except (OSError, AttributeError) as err:
            outcome = ConvMatError(f"CHOLMOD could not be loaded from {found[0]!r}: {err}")
        _LIBRARY.append(outcome)
    if isinstance(_LIBRARY[0], ConvMatError):
        raise _LIBRARY[0]
    return _LIBRARY[0]


class Factorization(NamedTuple):
    """What the certificate needs from a factorisation.

    Attributes:
        failed_column: where a pivot was not positive (the factor's order); None on success.
        row_count: the most entries stored in a row of the factor (None through cvxopt).
        factor_nnz: the entries stored (None through cvxopt).
        via: ``"direct"`` or, where :func:`library` refused, ``"cvxopt"``.
    """

    failed_column: int | None
    row_count: int | None
    factor_nnz: int | None
    via: str


def factor(
    row: np.ndarray, col: np.ndarray, values: np.ndarray, perm: np.ndarray, n: int,
    times: dict[str, float],
) -> Factorization:  # fmt: skip
    """Supernodal Cholesky of the symmetric matrix whose lower triangle is ``(row, col,
    values)`` (sorted by row, then column) in the order ``perm``: directly where
    :func:`library` accepts the library, else through cvxopt's interface.

    Shape:
        ``row``, ``col``, ``values``: ``(entries,)``; ``perm``: ``(n,)``.

    >>> import numpy as np
    >>> row, col = np.array([0, 1, 1]), np.array([0, 0, 1])
    >>> factor(row, col, np.array([4.0, 2.0, 5.0]), np.arange(2), 2, {}).failed_column is None
    True
    >>> factor(row, col, np.array([1.0, 2.0, 1.0]), np.arange(2), 2, {}).failed_column
    1
    """
    try:
        lib = library()
    except ConvMatError:
        load_cvxopt()  # cvxopt itself missing: say how to install it
        return factor_cvxopt(row, col, values, perm, n, times)
    with lib.factor(row, col, values, perm, n, times) as f:
        if f.failed_column is not None:
            return Factorization(f.failed_column, None, None, "direct")
        return Factorization(None, int(f.row_counts().max(initial=0)), f.stored_entries, "direct")


def factor_cvxopt(
    row: np.ndarray, col: np.ndarray, values: np.ndarray, perm: np.ndarray, n: int,
    times: dict[str, float],
) -> Factorization:  # fmt: skip
    """:func:`factor` through cvxopt's interface (the given order only; no factor structure).

    Shape:
        as :func:`factor`.
    """
    cvxopt = load_cvxopt()
    start = time.perf_counter()
    m = cvxopt.spmatrix(
        cvxopt.matrix(values), cvxopt.matrix(col.astype(np.int64)),
        cvxopt.matrix(row.astype(np.int64)), (n, n),
    )  # fmt: skip
    times["assemble"] = times.get("assemble", 0.0) + time.perf_counter() - start
    cholmod = cvxopt.cholmod
    saved = dict(cholmod.options)
    start = time.perf_counter()
    try:
        cholmod.options["supernodal"] = _SUPERNODAL
        cholmod.options["nmethods"] = 1  # the given order (cvxopt's default also tries AMD)
        factored = cholmod.symbolic(m, p=cvxopt.matrix(perm.astype(np.int64)), uplo="U")
        times["symbolic"] = time.perf_counter() - start
        start = time.perf_counter()
        cholmod.numeric(m, factored)
    except ArithmeticError as err:
        return Factorization(int(err.args[0]) if err.args else -1, None, None, "cvxopt")
    finally:
        times["numeric"] = time.perf_counter() - start
        cholmod.options.clear()
        cholmod.options.update(saved)
    return Factorization(None, None, None, "cvxopt")
