"""Rotations that suppress activation outliers without changing the model's function (QuaRot):
Hadamard matrices and factored transforms (``hadamard``), and the steps that fuse them into a
model (``rotate``)."""
