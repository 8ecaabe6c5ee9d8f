"""What the benches share: the harness (models, anchors' runs, timing, KL), llama.cpp's anchor tools, and the
makers of the real and off-grid models. A bench script imports `from lib import harness`; a maker runs as
`python -m lib.real_models NAME` from bench/."""
