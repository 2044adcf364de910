"""Spectral normalisation by the operator norm of the convolution itself.

``torch.nn.utils.parametrizations.spectral_norm`` divides a convolution's kernel by the largest
singular value of the kernel reshaped to ``(C_out, C_in/groups * prod(kernel))``. That is not the
norm of the layer as a linear map on its inputs (PyTorch issue 99149): a stride-1 layer's norm is
up to ``sqrt(prod(kernel))`` times larger, a strided one's may be smaller, and padding changes it
again. :func:`spectral_norm` is the same parametrization for the convolution's matrix W at a given
input size: its left and right singular vectors are tensors shaped like one output
``(C_out, *output_size)`` and one input ``(C_in, *input_size)``, advanced by power iteration with
W (torch's own convolution) and its adjoint (the matching transposed convolution, with the
padding folded back for reflect/replicate/circular), both from :class:`ConvOperator`.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._errors import ConvMatError
from ..engine import Geometry, check_int
from .operator import ConvOperator

__all__ = ["ConvSpectralNorm", "spectral_norm"]

#: Power iterations run when the parametrization is registered (torch runs 15 on the reshaped
#: kernel; the operator's spectrum is denser at its top, and each step costs one convolution of
#: a single input and its adjoint).
INIT_ITERATIONS = 50


def _check_positive(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0 < float(value) < float("inf")
    ):
        raise ConvMatError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _normalized(t: torch.Tensor, eps: float) -> torch.Tensor:
    """``t / max(||t||, eps)`` over the whole tensor (as ``F.normalize`` on the flat vector)."""
    norm: torch.Tensor = torch.linalg.vector_norm(t)
    return t / norm.clamp_min(eps)


class ConvSpectralNorm(nn.Module):
    """The parametrization that :func:`spectral_norm` registers: ``weight * bound / sigma``.

    ``sigma = <u, W v>`` estimates the operator norm of the convolution W at the input size it
    was built for; ``u`` (``_u``, one output's shape) and ``v`` (``_v``, one input's shape) are
    persistent buffers, advanced by ``n_power_iterations`` steps ``u <- W v / ||W v||``,
    ``v <- W^T u / ||W^T u||`` (no gradient) at each forward in training mode and left as they
    are in eval mode. The gradient flows through W in ``sigma`` as in torch's parametrization.

    Args:
        weight: the layer's current weight.
        geometry: the layer's configuration at its input size (from
            :meth:`convmat.engine.Geometry.from_module`).
        n_power_iterations: steps per training forward.
        bound: the operator norm the normalised layer gets.
        eps: the smallest norm divided by (vectors and ``sigma``).
        init_iterations: steps run now, so that the first forward is already close.

    Attributes:
        geometry: the convolution's configuration (input size included).
        n_power_iterations, bound, eps: as given.

    Shape:
        ``_u``: ``(C_out, *output_size)``; ``_v``: ``(C_in, *input_size)`` (of the layer as it
        runs: for a transposed convolution, its own input and output).

    >>> conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)
    >>> param = ConvSpectralNorm(conv.weight.detach(), Geometry.from_module(conv, 8), 1, 1.0)
    >>> param._u.shape, param._v.shape
    (torch.Size([1, 8]), torch.Size([1, 8]))
    """

    _u: torch.Tensor  # buffers, registered in __init__
    _v: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        geometry: Geometry,
        n_power_iterations: int = 1,
        bound: float = 1.0,
        eps: float = 1e-12,
        init_iterations: int = INIT_ITERATIONS,
    ) -> None:
        super().__init__()
        self.geometry = geometry
        self.n_power_iterations = check_int(n_power_iterations, "n_power_iterations", 1)
        self.bound = _check_positive(bound, "bound")
        self.eps = _check_positive(eps, "eps")
        init_iterations = check_int(init_iterations, "init_iterations", 0)
        op = ConvOperator.from_geometry(weight.detach(), geometry)
        u = weight.new_empty(op.out_shape).normal_(0, 1)
        v = weight.new_empty(op.in_shape).normal_(0, 1)
        self.register_buffer("_u", _normalized(u, self.eps))
        self.register_buffer("_v", _normalized(v, self.eps))
        self._power_method(weight, init_iterations)

    def _operator(self, weight: torch.Tensor) -> ConvOperator:
        return ConvOperator.from_geometry(weight, self.geometry)

    @torch.no_grad()
    def _power_method(self, weight: torch.Tensor, n_power_iterations: int) -> None:
        # In place, as torch does (DataParallel replicas share the buffers' storage).
        op = self._operator(weight.detach())
        adjoint = op.H
        for _ in range(n_power_iterations):
            self._u.copy_(_normalized((op @ self._v[None])[0], self.eps))
            self._v.copy_(_normalized((adjoint @ self._u[None])[0], self.eps))

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """``<u, W v>`` with the stored vectors (no update), differentiable in ``weight``: the
        operator norm's estimate (a lower bound of it up to rounding, ``u`` and ``v`` being
        unit vectors).

        Args:
            weight: the layer's unnormalised weight.

        Returns:
            A 0-d tensor.

        Shape:
            a scalar.

        >>> conv = nn.Conv1d(1, 1, 1, bias=False)
        >>> param = ConvSpectralNorm(conv.weight.detach(), Geometry.from_module(conv, 4))
        >>> torch.isclose(param.sigma(conv.weight), conv.weight.abs().sum()).item()
        True
        """
        # Cloned, as in torch: a second forward's update must not change what the first
        # forward's graph saved.
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = torch.vdot(u.reshape(-1), (self._operator(weight) @ v[None]).reshape(-1))
        return sigma.real if sigma.is_complex() else sigma

    # Eager under torch.compile: the operator's cache (a lock, a comparison of kernel values)
    # cannot be traced, and tracing up to it costs far more than the few small convolutions here.
    @torch.compiler.disable(reason="convmat's ConvOperator keeps a kernel cache behind a lock")  # type: ignore[untyped-decorator]
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._power_method(weight, self.n_power_iterations)
        return weight * (self.bound / self.sigma(weight).clamp_min(self.eps))

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` itself (as torch's parametrization: assigning a weight sets the
        unnormalised one)."""
        return value

    def extra_repr(self) -> str:
        geo = self.geometry
        return (
            f"input_size={geo.input_size}, bound={self.bound}, "
            f"n_power_iterations={self.n_power_iterations}"
        )


def spectral_norm(
    module: nn.Module,
    input_size: int | tuple[int, ...],
    *,
    name: str = "weight",
    n_power_iterations: int = 1,
    bound: float = 1.0,
    eps: float = 1e-12,
    init_iterations: int = INIT_ITERATIONS,
) -> nn.Module:
    """Normalise a convolution layer to operator norm ``bound`` at ``input_size``.

    A drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` that divides the weight by
    the operator norm of the convolution (its matrix W on inputs of ``input_size``) instead of the
    norm of the reshaped kernel. Registered with ``torch.nn.utils.parametrize``: ``module.weight``
    becomes ``original * bound / sigma`` with ``sigma = <u, W v>``; in training mode each forward
    first advances ``u`` and ``v`` by ``n_power_iterations`` power steps with the convolution and
    its adjoint (no gradient), and in eval mode the stored vectors are used as they are. The
    buffers are persistent (``state_dict`` keys ``parametrizations.weight.0._u`` / ``._v``);
    loading them into a layer registered at another input size fails on their shapes.

    The weight is always divided, as torch does: ``bound`` is the norm the layer gets, not a
    ceiling. ``sigma`` never exceeds the norm (unit vectors), so once the iteration has converged
    the layer's norm is ``bound`` to the accuracy of the iteration, from above. The norm holds at
    ``input_size`` only: the same kernel on other sizes has another norm. A transposed layer is
    normalised with its own ``output_padding`` (not one asked for by ``forward(x, output_size)``).
    Every configuration convmat supports works: 1-D to 3-D, transposed, any stride, dilation,
    groups, padding and padding mode; complex weights use the conjugate transpose.

    ``torch.compile`` works (forward and backward, checked on CPU by the tests), with one graph
    break: the parametrization runs eagerly (``torch.compiler.disable``), since the operator's
    kernel cache (a lock, a comparison of kernel values) cannot be traced; the rest of the model
    compiles. ``fullgraph=True`` is therefore refused by torch.

    Args:
        module: a plain ``nn.Conv{1,2,3}d`` or ``nn.ConvTranspose{1,2,3}d`` (or convmat's matrix
            twins); a subclass with its own ``forward`` is refused.
        input_size: spatial size of the inputs the layer will see.
        name: the parameter to normalise; only ``"weight"`` (the kernel) is a convolution.
        n_power_iterations: power steps per training forward (>= 1).
        bound: the operator norm the layer is normalised to (> 0).
        eps: the smallest norm divided by, for the vectors and ``sigma`` (> 0).
        init_iterations: power steps run at registration (>= 0; torch runs 15).

    Returns:
        ``module``, parametrized.

    Raises:
        ConvMatError: a module that is not a plain convolution (its class and why), a bad
            ``input_size`` (or one the kernel does not fit), ``name`` other than ``"weight"``,
            ``n_power_iterations`` or ``init_iterations`` not an int >= its minimum, ``bound`` or
            ``eps`` not a finite number > 0.

    Shape:
        ``module.weight`` keeps its shape; the buffers are ``(C_out, *output_size)`` and
        ``(C_in, *input_size)``.

    >>> import convmat
    >>> _ = torch.manual_seed(0)
    >>> conv = nn.Conv2d(2, 3, 3, padding=1).double()
    >>> conv = spectral_norm(conv, (8, 8), bound=2.0, n_power_iterations=10)
    >>> for _ in range(50):  # a training loop would step an optimizer here
    ...     _ = conv(torch.randn(1, 2, 8, 8, dtype=torch.float64))
    >>> _ = conv.eval()
    >>> round(convmat.operator_norm(conv.weight.detach(), (8, 8), padding=1).value, 6)
    2.0
    """
    if not isinstance(module, nn.Module):
        raise ConvMatError(
            f"module must be a convolution layer (nn.Conv{{1,2,3}}d or "
            f"nn.ConvTranspose{{1,2,3}}d), got {type(module).__name__}"
        )
    if name != "weight":
        raise ConvMatError(
            f"name must be 'weight' (the convolution's kernel, whose operator norm is taken), "
            f"got {name!r}"
        )
    n_power_iterations = check_int(n_power_iterations, "n_power_iterations", 1)
    bound = _check_positive(bound, "bound")
    eps = _check_positive(eps, "eps")
    init_iterations = check_int(init_iterations, "init_iterations", 0)
    geometry = Geometry.from_module(module, input_size)
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    param = ConvSpectralNorm(
        weight.detach(), geometry, n_power_iterations, bound, eps, init_iterations
    )
    param.train(module.training)
    parametrize.register_parametrization(module, name, param)
    return module
