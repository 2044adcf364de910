"""to_mlp: whole CNNs as Flatten + Linear + activations, exact in float64."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from convmat import ConvMatError, to_mlp
from convmat.layers.linear import SparseLinear


def _randomise_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


MODELS = {
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv1d(3, 2, 2, dilation=2),
        ),
        (2, 11),
    ),
    "conv3d": (
        lambda: nn.Sequential(
            nn.Conv3d(1, 2, 2, groups=1),
            nn.ELU(),
            nn.Conv3d(2, 2, 2, groups=2, padding_mode="circular", padding=1),
        ),
        (1, 4, 4, 3),
    ),
    "conv_transpose": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=1), nn.Sigmoid()
        ),
        (2, 3, 4),
    ),
    "batchnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.GELU(), nn.BatchNorm2d(3, affine=False)
        ),
        (1, 5, 5),
    ),
    "batchnorm1d": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.SiLU()),
        (3, 4),
    ),
    "avgpool": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 2, 1),
            nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
            nn.Tanh(),
            nn.AvgPool2d(2),
        ),
        (2, 9, 8),
    ),
    "adaptive": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 2, 3), nn.AdaptiveAvgPool1d(4), nn.Softplus(), nn.AvgPool1d(2)
        ),
        (2, 13),
    ),
    "adaptive3d": (
        lambda: nn.Sequential(nn.AdaptiveAvgPool3d((2, 1, 3)), nn.LeakyReLU(0.2)),
        (2, 5, 3, 4),
    ),
    "flatten_unflatten_dropout": (
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Unflatten(1, (2, 3, 3)),
            nn.Conv2d(2, 1, 2),
            nn.Identity(),
            nn.Flatten(),
            nn.Linear(4, 2),
        ),
        (2, 3, 3),
    ),
    "lenet": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Sequential(nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2)),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        ),
        (1, 28, 28),
    ),
    "encoder_decoder": (
        lambda: nn.Sequential(
            nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1),
                nn.BatchNorm2d(8),
                nn.LeakyReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1),
                nn.ReLU(),
            ),
            nn.Sequential(
                nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1),
                nn.Sigmoid(),
            ),
        ),
        (3, 16, 16),
    ),
}


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name", list(MODELS))
def test_to_mlp_matches_model(name, sparse):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().double()
    _randomise_batchnorm(model)
    model.eval()
    mlp = to_mlp(model, shape, sparse=sparse, dtype=torch.float64)
    assert isinstance(mlp[0], nn.Flatten)
    linear = SparseLinear if sparse else nn.Linear
    for m in mlp[1:]:
        assert (
            isinstance(m, linear)
            or not any(True for _ in m.parameters())
            or isinstance(m, nn.PReLU)
            or type(m).__module__.startswith("torch.nn.modules.activation")
        )
    # No two linear layers in a row: consecutive affine maps are merged.
    kinds = [isinstance(m, linear) for m in mlp[1:]]
    assert not any(a and b for a, b in itertools.pairwise(kinds))
    x = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), model(x).flatten(1), rtol=0, atol=1e-10)


def test_lenet_merges_into_expected_layers():
    torch.manual_seed(0)
    model = MODELS["lenet"][0]().double().eval()
    mlp = to_mlp(model, (1, 28, 28))
    assert [type(m).__name__ for m in mlp] == [
        "Flatten",
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
        "Linear",
    ]
    # conv1 (6*28*28 outputs); pool2+conv2+bn merged into one map; then pool, flatten, fc1.
    assert mlp[1].weight.shape == (6 * 28 * 28, 28 * 28)
    assert mlp[3].weight.shape == (16 * 10 * 10, 6 * 28 * 28)
    assert mlp[5].weight.shape == (120, 16 * 10 * 10)


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))),
            (1, 6, 6),
            r"^1\.1 \(MaxPool2d\) is not supported by to_mlp",
        ),
        (
            nn.Sequential(nn.Conv2d(2, 2, 1), Residual()),
            (2, 4, 4),
            r"^1 \(Residual\) is not supported",
        ),
        (Residual(), (2, 4, 4), r"^Residual \(Residual\) is not supported"),
        (nn.Sequential(nn.Conv1d(1, 1, 1), nn.PReLU(3)), (1, 4), r"^1 \(PReLU\) is not supported"),
        (
            nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)),
            (2, 3),
            r"^0 \(BatchNorm1d\) has no running statistics",
        ),
        (
            nn.Sequential(nn.Conv1d(1, 1, 1), nn.Linear(4, 2)),
            (1, 4),
            r"^1 \(Linear\) is applied to a non-flat input of shape \(1, 4\)",
        ),
    ],
)
def test_to_mlp_errors_name_the_layer(model, shape, match):
    with pytest.raises(ConvMatError, match=match):
        to_mlp(model.eval(), shape)


def test_to_mlp_rejects_training_mode():
    with pytest.raises(
        ConvMatError, match=r"Sequential is in training mode; to_mlp needs model\.eval\(\)"
    ):
        to_mlp(nn.Sequential(nn.Conv1d(1, 1, 1), nn.Dropout()), (1, 4))
