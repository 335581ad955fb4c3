"""What the cost model and the instrumented interpreter report: CostReport (predicted), Measurement (counted) and
the Breakdown `moa cost` prints beside a CostReport."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Breakdown", "CostReport", "Measurement"]


@dataclass(frozen=True)
class CostReport:
    """Predicted cost of a call (sum over the program's outputs), computed from the ONF without running anything.

    flops, transcendentals, dram_bytes(_loaded/_stored), tiles_visited: what the fused kernel does (exactly what
    `measure` counts for the same config; see Measurement for the tiles of hop loops, the window-mixing kernel
    and the linear form). tiles_needed: (query tile, key tile or hop) pairs holding an admissible (i, j).
    intermediate_bytes: global memory beyond inputs, outputs and lse (0: fused; the linear form's chunk states).
    unfused_*: the PyTorch
    eager plan (moa.cost.eager_plan). onchip_bytes: tiles one program holds. arithmetic_intensity = flops /
    dram_bytes. predicted_seconds and bound ("compute" / "memory" / "transcendental") from the device table.
    With no dims every field is a sympy formula (tiles_needed None, bound "symbolic")."""
    flops: object
    transcendentals: object
    dram_bytes: object
    dram_bytes_loaded: object
    dram_bytes_stored: object
    tiles_visited: object
    tiles_needed: object
    intermediate_bytes: object
    unfused_dram_bytes: object
    unfused_intermediate_bytes: object
    onchip_bytes: object
    arithmetic_intensity: object
    predicted_seconds: object
    bound: str
    form: str


@dataclass(frozen=True)
class Measurement:
    """Counters of a real run in the instrumented Triton interpreter (sum over the program's outputs).

    tiles_visited: key-tile iterations whose body executed (hop iterations for a hop loop), summed over programs
    and branches; for the window-mixing kernel the (row tile, hop) iterations of its first hop loop; for the
    chunked linear form the (chunk, feature tile) iterations of its scan. It is read from the interpreter as the
    number of times one load statement of that loop body executed (identified by its source line: a load that
    the kernel's ledger places in the region, assigned on no other line of the function)."""
    flops: int
    transcendentals: int
    dram_bytes: int
    dram_bytes_loaded: int
    dram_bytes_stored: int
    tiles_visited: int
    programs: int


@dataclass(frozen=True)
class Breakdown:
    """What `moa cost` prints besides the CostReport."""
    device: object
    dtype: str
    configs: dict                 # output -> Config
    dot_flops: object
    programs: object
    hbm_bytes: object
    parts: dict                   # compute / memory / transcendental seconds
    unfused_flops: object
    unfused_seconds: object
    unfused_bound: str
    unfused_ops: list
    fraction_of_peak: object
    launches: int = 1             # kernel launches of the fused call (linear form 3, a split schedule 1 per branch)
