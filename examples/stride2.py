"""The matrix of a 1-D convolution: kernel 3, input 10, stride 2, next to torch's own result."""

import torch
import torch.nn.functional as F

import convmat

torch.set_printoptions(precision=2, linewidth=120)

kernel = torch.tensor([[[0.5, 1.0, -2.0]]])  # (C_out, C_in, k) = (1, 1, 3)
x = torch.arange(1.0, 11.0)  # the input 1, 2, ..., 10
stride = 2

W = convmat.conv_matrix(kernel, 10, stride=stride)
(out,) = convmat.conv_output_size(10, 3, stride=stride)
print(f"output size: floor((10 - 3) / {stride}) + 1 = {out}")
print(
    f"W ({W.shape[0]} x {W.shape[1]}): the kernel on every row, {stride} columns further each time"
)
print(W)

y_matrix = W @ x
y_torch = F.conv1d(x.view(1, 1, 10), kernel, stride=stride).flatten()
print("W @ x            :", y_matrix)
print("F.conv1d(x, w, 2):", y_torch)
assert torch.equal(y_matrix, y_torch), "the matrix and torch disagree"
print("they agree exactly")
