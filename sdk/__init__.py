"""edgeq: fine-tuned small language models, exported for and run on edge devices."""
__version__ = "0.1.0"

from .comparing import compare  # noqa: E402
from .errors import EdgeqError  # noqa: E402
from .exporting import export  # noqa: E402
from .loading import load  # noqa: E402
from .planning import plan  # noqa: E402
from .quality import evaluate  # noqa: E402
from .bundle import read_manifest as inspect  # noqa: E402
from .profiling import profile  # noqa: E402
from .releasing.run import release  # noqa: E402
from .serving.listener import serve  # noqa: E402

__all__ = ["EdgeqError", "load", "export", "evaluate", "compare", "inspect", "plan", "profile", "release", "serve", "__version__"]
