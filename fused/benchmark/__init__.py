"""Everything the benchmarks measure with, in one room.

- ``shapes``: the SD 1.5 shape table (``SD15_ATTN2``, ``SD15_IMAGE``), benchmark sizes, dtype names;
- ``timing``: the one timer (``time_ms``) and peak-memory probe (``PeakMemory``);
- ``baselines``: what the fused path is measured against (docs/shapes.md §4): the
  op-level ``paper_maps``/``paper_otsu_loop`` and the ``official``, ``paper`` and
  ``diffusers+maps`` attention processors (``BASELINES``);
- ``ops``: the op cases of ``vico bench`` and ``benchmarks/gpu_check.py`` (``cases``, ``run``, ``format_table``).

The scripts that run whole benchmarks (``bench_vico_step.py``, ``bench_joint_maps.py``,
``scaling.py``, ``gpu_check.py``) live in ``benchmarks/``.
"""

from .baselines import BASELINES, paper_maps, paper_otsu_loop
from .ops import Case, cases, format_table, measure, run
from .shapes import DTYPES, SD15_ATTN2, SD15_IMAGE, SIZES
from .timing import PeakMemory, median, time_ms

__all__ = ["BASELINES", "Case", "DTYPES", "PeakMemory", "SD15_ATTN2", "SD15_IMAGE", "SIZES", "cases", "format_table",
           "measure", "median", "paper_maps", "paper_otsu_loop", "run", "time_ms"]
