"""The layers: matrix-form twins of torch's convolutions, the one-signal ``Conv1D``, and
convolutions as ``nn.Linear`` (:func:`to_linear`, :func:`to_mlp`). Built on the engine and
:mod:`convmat.matrix`; nothing here imports the analysis or the presentation."""
