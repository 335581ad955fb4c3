"""What `explain` shows besides the IR, DNF and ONF: the (query tile, key tile) map of a branch."""
from __future__ import annotations

import numpy as np

from moa import tiles as TL
from moa import symbolic as sy


def tile_map(k, name: str, branch: int, dims: dict, config):
    """(R x T) int array over (query tile, key tile): 0 skipped, 1 full (no mask code), 2 partial (mask code
    runs), 3 visited although no (i, j) of it is admissible (the analysis could not prove the skip)."""
    sched = k.schedules[name]
    b = sched.branches[branch]
    n = sy.evaluate(sched.row[1], dims)
    m = sy.evaluate(b.extent, dims)
    bm, bn = config.block_m, config.block_n
    R, T = -(-n // bm), -(-m // bn)
    env = {d: dims[d.name] for d in k.program.dims}
    for v, _ in sched.lead:
        env[v] = 0                               # the map of the first head
    grid = np.zeros((R, T), dtype=np.int8)
    tiles = TL.branch_tiles(b, env, n, m, bm, bn)
    sel = tiles.visited
    grid[tiles.rows[sel], tiles.starts[sel] // bn] = np.where(tiles.partial[sel], 2, 1)
    if b.mask is not None and R * T and n * m <= 1 << 26:
        need = _needed_grid(b, sched.row[0], env, n, m, bm, bn)
        grid[(grid > 0) & ~need] = 3
    return grid


def _needed_grid(b, row_var, env, n, m, bm, bn):
    R, T = -(-n // bm), -(-m // bn)
    i = np.arange(n)[:, None]
    j = np.arange(m)[None, :]
    res = TL.mask3(b.mask, {**env, row_var: i, b.var: j})
    poss = np.broadcast_to(res[1] if res[0] == "b" else True, (n, m))
    full = np.zeros((R * bm, T * bn), dtype=bool)
    full[:n, :m] = poss
    return full.reshape(R, bm, T, bn).any(axis=(1, 3))
