"""Progress bars for long steps: shown on a terminal (or when asked), silent in pipes and tests; and the
libraries underneath kept quiet on the command line."""
from __future__ import annotations

from tqdm.auto import tqdm


def bar(total: int | None, desc: str, unit: str = "it", progress: bool | None = None, **kwargs) -> tqdm:
    """`progress=None` shows the bar only when stderr is a terminal."""
    disable = None if progress is None else not progress
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True, **kwargs)


def quiet_libraries() -> None:
    """For the CLI: the libraries edgeq drives (transformers, torch, coremltools, onnx) warn and draw progress
    bars of their own, dozens of lines per export. By default those warnings go to the log below WARNING and
    their bars stay hidden, so edgeq's own bar is the one progress line; `-v` shows everything again."""
    import logging
    import os

    # tqdm reads TQDM_* as defaults: third-party bars are off, edgeq's own pass `disable` explicitly.
    for name, value in (("TQDM_DISABLE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(name, value)
    logging.captureWarnings(True)  # warnings.warn from any library becomes a record of the py.warnings logger
    for name in ("py.warnings", "transformers", "torch", "coremltools", "onnx", "onnxruntime", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
