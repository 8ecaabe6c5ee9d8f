"""ExecuTorch `.pte` (XNNPACK): spec (light), program facts shared by converter and engine, converter (heavy)."""

# What the ExecuTorch engine reads too: the pins it checks before importing executorch (`spec`) and the program's
# method, inputs and kernel libraries (`program`). Nothing else of the format (tests/test_layering.py).
SHARED_WITH_ENGINES = ("spec", "program")
