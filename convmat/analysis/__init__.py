"""The analysis: the matrix-free operator and its adjoint, singular values and operator norms,
Lipschitz reports. Built on the engine, :mod:`convmat.matrix` and the layers."""
