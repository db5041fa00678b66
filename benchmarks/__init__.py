"""paratime's benchmarks, installed as :mod:`paratime.bench` (the top layer: it may import everything below).

``suite`` runs the scaling suite behind ``paratime bench``; ``fixtures`` registers the benchmark-only models
(``mlp``, ``unet``); ``scoring`` scores samples against their sequential reference (per sample, over the tolerance
in force); the ``*.py`` scripts beside them print one comparison each.
"""

from . import fixtures  # noqa: F401 - registers the benchmark models
from .suite import (Case, compare_paradigms, default_suite, machine, paradigms_loop, paradigms_markdown, plot,
                    run_suite, to_markdown, worker)

__all__ = ["Case", "compare_paradigms", "default_suite", "machine", "paradigms_loop", "paradigms_markdown", "plot",
           "run_suite", "to_markdown", "worker"]
