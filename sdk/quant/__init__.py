"""Quantization science: calibration data, importance, GPTQ, per-tensor sensitivity, the budget and the solver.

Formats supply their own precision spaces (`edgeq.formats.PrecisionSpace`, declared by each format's spec);
this package only asks for them.
"""
