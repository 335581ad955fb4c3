"""The CostReport of the chunked linear form (moa/linear.py), from its leading-order counts."""
from __future__ import annotations

import math

from moa import symbolic as sy
from moa.devices import canonical_dtype
from moa.errors import UnsupportedError

from .costing import CostReport, cost_breakdown


def runs_linear(kernel, name, dims, device, dtype) -> bool:
    try:
        return kernel.choose_form(name, dims, device=str(device), dtype=dtype) == "linear"
    except (UnsupportedError, KeyError):
        return False


def linear_cost(kernel, name, dtype, device, dims) -> CostReport:
    """The chunked linear form's CostReport (form='linear'), from the leading-order counts of moa/linear.py
    (form_costs: padded tiles of the three chunked kernels, not the exact ledger of the tiled kernel); the unfused
    plan is the same program's eager PyTorch plan."""
    from moa import linear
    from moa.devices import get_device

    from .kernel import Kernel

    dev = get_device(device)
    lp = kernel.linear_plans[name][0]
    eb = 8 if canonical_dtype(dtype) == "float64" else 2 if canonical_dtype(dtype) in ("float16", "bfloat16") else 4
    ab = 8 if eb == 8 else 4
    c = linear.form_costs(lp, dims, elem_bytes=eb, acc_bytes=ab)["linear"]
    quad = cost_breakdown(Kernel(kernel.program, kernel.dnf, form="quadratic"), dtype, device, needed=False,
                          **dims)[0]
    d = sy.evaluate(lp.branch.dot.extent, dims)
    n = sy.evaluate(lp.schedule.row[1], dims)
    e = sy.evaluate(lp.schedule.col[1], dims)
    chunks = -(-n // 64)
    zl = math.prod(sy.evaluate(x, dims) for _, x in lp.schedule.lead)
    states = ab * zl * chunks * lp.features(d) * (e + 1)  # per-chunk states and normalisers
    trans = zl * n * 64 if lp.ga is not None else 0  # gate exponentials (leading order)
    seconds = max(c.flops / dev.vector_rate(dtype), c.dram_bytes / dev.hbm_bytes_per_s) + 3 * dev.launch_s
    bound = "compute" if c.flops / dev.vector_rate(dtype) >= c.dram_bytes / dev.hbm_bytes_per_s else "memory"
    stored = states * 2 + eb * n * e
    return CostReport(flops=c.flops, transcendentals=trans, dram_bytes=c.dram_bytes,
                      dram_bytes_loaded=c.dram_bytes - stored, dram_bytes_stored=stored,
                      tiles_visited=chunks, tiles_needed=chunks, intermediate_bytes=states,
                      unfused_dram_bytes=quad.unfused_dram_bytes,
                      unfused_intermediate_bytes=quad.unfused_intermediate_bytes, onchip_bytes=c.onchip_state_bytes,
                      arithmetic_intensity=c.flops / c.dram_bytes, predicted_seconds=seconds, bound=bound,
                      form="linear")
