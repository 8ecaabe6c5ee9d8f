"""ExecuTorch `.pte` (XNNPACK): spec (light), program facts shared by converter and engine, converter (heavy)."""
