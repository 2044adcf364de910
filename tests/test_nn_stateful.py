"""Random lives of a matrix layer beside its torch twin (Hypothesis state machines).

Every route by which a layer's weights or dtype change in real code (optimizer steps, ``.data``
edits, ``load_state_dict``, ``functional_call`` with other weights, ``.to(dtype)``) is a rule;
after every step the matrix layer's output and gradients equal torch's in float64 (1e-10).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn
from torch.func import functional_call

from convmat.nn import MatrixConv1d, MatrixConv2d, MatrixConvTranspose1d, MatrixConvTranspose2d

F64 = torch.float64
SEEDS = st.integers(0, 2**31 - 1)
LAYOUTS = st.sampled_from(["blocks", "dense", torch.sparse_csr, torch.strided])


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


class LayerLife(RuleBasedStateMachine):
    """One matrix layer and its torch twin, driven by the same random steps."""

    matrix_class: type[nn.Module]
    torch_class: type[nn.Module]
    kwargs: dict
    sizes: list[tuple[int, ...]]  # spatial input sizes the layer meets

    def __init__(self) -> None:
        super().__init__()
        self.twin: nn.Module | None = None

    @initialize(layout=LAYOUTS, seed=SEEDS)
    def make(self, layout, seed):
        torch.manual_seed(seed)
        self.ref = self.torch_class(**self.kwargs, dtype=F64)
        self.twin = self.matrix_class.from_module(self.ref, layout=layout)
        self.opts = [
            torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5) for m in (self.ref, self.twin)
        ]
        self.gen = torch.Generator().manual_seed(seed)
        self.probe = self._input(1, self.sizes[0])

    def _input(self, batch, size, dtype=F64):
        shape = (batch, self.kwargs["in_channels"], *size)
        return torch.randn(shape, dtype=F64, generator=self.gen).to(dtype)

    def _random_like(self, t):
        return torch.randn(t.shape, dtype=t.dtype, generator=self.gen)

    # -- rules -----------------------------------------------------------------------------
    @precondition(lambda self: self.twin is not None)
    @rule(batch=st.integers(0, 3), which=st.integers(0, 2))
    def forward_backward(self, batch, which):
        x = self._input(batch, self.sizes[which])
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        for m in (self.ref, self.twin):
            m.zero_grad()
        y1, y2 = self.twin(x1), self.ref(x2)
        assert y1.shape == y2.shape
        assert_same(y1, y2)
        g = self._random_like(y2)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        assert_same(x1.grad, x2.grad)
        assert_same(self.twin.weight.grad, self.ref.weight.grad)
        assert_same(self.twin.bias.grad, self.ref.bias.grad)

    @precondition(lambda self: self.twin is not None)
    @rule()
    def optimizer_step(self):
        for opt in self.opts:
            opt.step()

    @precondition(lambda self: self.twin is not None)
    @rule(how=st.sampled_from(["normal", "clamp", "scale", "ema"]))
    def change_data_in_place(self, how):
        """Values changed through ``.data`` (no version bump): init, clipping, EMA."""
        fresh = self._random_like(self.ref.weight)
        for m in (self.ref, self.twin):
            data = m.weight.data
            if how == "normal":
                data.copy_(fresh)
            elif how == "clamp":
                data.clamp_(-0.05, 0.05)
            elif how == "scale":
                data.mul_(-1.5)
            else:
                data.mul_(0.9).add_(0.1 * fresh)

    @precondition(lambda self: self.twin is not None)
    @rule()
    def load_state(self):
        state = {k: self._random_like(v) for k, v in self.ref.state_dict().items()}
        for m in (self.ref, self.twin):
            m.load_state_dict(state)

    @precondition(lambda self: self.twin is not None)
    @rule(which=st.integers(0, 2))
    def functional_call_with_fresh_weights(self, which):
        x = self._input(2, self.sizes[which])
        params = {
            k: self._random_like(v).requires_grad_() for k, v in self.ref.named_parameters()
        }
        y1 = functional_call(self.twin, params, (x,))
        y2 = functional_call(self.ref, params, (x,))
        assert_same(y1, y2)
        g = self._random_like(y2)
        grads1 = torch.autograd.grad((y1 * g).sum(), list(params.values()))
        grads2 = torch.autograd.grad((y2 * g).sum(), list(params.values()))
        for a, b in zip(grads1, grads2):
            assert_same(a, b)

    @precondition(lambda self: self.twin is not None)
    @rule(which=st.integers(0, 2))
    def float32_roundtrip(self, which):
        """``.float()``, a float32 forward (float32 accuracy), back with ``.double()``."""
        for m in (self.ref, self.twin):
            m.float()
        x = self._input(2, self.sizes[which], torch.float32)
        y1, y2 = self.twin(x), self.ref(x)
        scale = max(1.0, y2.abs().max().item())
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5 * scale)
        for m in (self.ref, self.twin):
            m.double()

    @precondition(lambda self: self.twin is not None)
    @rule(train=st.booleans())
    def train_or_eval(self, train):
        self.ref.train(train)
        self.twin.train(train)

    # -- after every step --------------------------------------------------------------------
    @precondition(lambda self: self.twin is not None)
    @invariant()
    def same_parameters_and_output(self):
        for (n1, p1), (n2, p2) in zip(self.twin.named_parameters(), self.ref.named_parameters()):
            assert n1 == n2 and p1.dtype == p2.dtype == F64
            assert_same(p1, p2)  # gradients agree to rounding, so steps do too
        assert self.twin.training == self.ref.training
        with torch.no_grad():
            assert_same(self.twin(self.probe), self.ref(self.probe))


SETTINGS = settings(max_examples=25, stateful_step_count=15, deadline=None)


class Conv1dLife(LayerLife):
    matrix_class, torch_class = MatrixConv1d, nn.Conv1d
    kwargs: ClassVar[dict] = dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="circular", groups=2)
    sizes: ClassVar[list] = [(5,), (8,), (3,)]


class Conv2dLife(LayerLife):
    matrix_class, torch_class = MatrixConv2d, nn.Conv2d
    kwargs: ClassVar[dict] = dict(in_channels=3, out_channels=2, kernel_size=3, stride=2, padding=1, padding_mode="reflect")
    sizes: ClassVar[list] = [(5, 5), (4, 6), (7, 3)]


class ConvTranspose1dLife(LayerLife):
    matrix_class, torch_class = MatrixConvTranspose1d, nn.ConvTranspose1d
    kwargs: ClassVar[dict] = dict(in_channels=2, out_channels=3, kernel_size=2, stride=3, dilation=2)
    sizes: ClassVar[list] = [(4,), (2,), (5,)]


class ConvTranspose2dLife(LayerLife):
    matrix_class, torch_class = MatrixConvTranspose2d, nn.ConvTranspose2d
    kwargs: ClassVar[dict] = dict(in_channels=4, out_channels=2, kernel_size=3, stride=2, padding=1, output_padding=1, groups=2)
    sizes: ClassVar[list] = [(3, 3), (2, 4), (4, 2)]


TestConv1dLife = Conv1dLife.TestCase
TestConv2dLife = Conv2dLife.TestCase
TestConvTranspose1dLife = ConvTranspose1dLife.TestCase
TestConvTranspose2dLife = ConvTranspose2dLife.TestCase
for _case in (TestConv1dLife, TestConv2dLife, TestConvTranspose1dLife, TestConvTranspose2dLife):
    _case.settings = SETTINGS

del _case
