"""Tile configurations of the three kernel families: what can be launched, before any choice among them.

`Config` (tiled kernel: BLOCK_M x BLOCK_N tiles), `LinearConfig` (chunked linear form: CHUNK rows, BLOCK_F
features) and `WindowConfig` (window-mixing kernel: BLOCK_M rows); each family's default for a call and its
candidates, in the order the GPU runtime tries them (runtime/configs.py and runtime/form_configs.py check them
ahead of time; runtime/plan.py chooses)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

try:   # host-side TMA descriptors (triton.tools, Triton >= 3.3); without them no config reads through TMA
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from moa import onf
from moa import symbolic as sy
from moa.errors import InputError, UnsupportedError

from .device import cdiv, next_pow2

DTYPE_NAME = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
              torch.bfloat16: "bfloat16"}


def state_dtype(dtname: str) -> str:
    """The dtype the chunked linear form's forward stores its chunk states in (runtime/linear_run.py, the cost
    model, AOT, the form choice): bfloat16 for a bfloat16 call (the running sums stay float32, only the stored
    copy is rounded), else the accumulator dtype (float16 has too little range for sums over the sequence)."""
    return "bfloat16" if dtname == "bfloat16" else "float64" if dtname == "float64" else "float32"


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one kernel."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False    # K / V key tiles through TMA tensor descriptors (Hopper; a tuning candidate on CUDA)
    overlap: bool = False   # the next full tile's q . k^T ahead of this tile's softmax (a tuning candidate on CUDA)

    def text(self) -> str:
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}" + \
            (" TMA" if self.tma else "") + (" overlap" if self.overlap else "")


def choose_config(device: torch.device, dtype: str, n: int, m: int, head: int) -> Config:
    """Block sizes for a call. The interpreter favours few, large programs; on a GPU the table follows the
    fused-attention tutorial's H100 choices with 8 warps (AOT for sm_90: 4 warps spill at d = 64). On CUDA,
    the GPU runtime checks this default ahead of time and falls back to smaller tiles when it spills
    (runtime/configs.py)."""
    if device.type == "cpu":
        return Config(min(64, sy.tile_width(n)), min(64, sy.tile_width(m)))
    if dtype == "float64":
        return Config(32, 32, 4, 1)
    if dtype == "float32":
        return Config(64, 32, 4, 2)
    return Config(128, 64, 8, 3)


MAX_TILE = 1 << 20  # triton's TRITON_MAX_TENSOR_NUMEL: no tile (rows x padded head dim) may hold more elements


def fit_tiles(cfg: Config, heads, what: str) -> Config:
    """Halve BLOCK_M / BLOCK_N (not below 16, tl.dot's minimum) until every tile of BLOCK x padded head dim
    holds at most 2^20 elements; a head dim that does not fit even with 16 rows is an UnsupportedError (never
    a Triton failure at launch)."""
    h = max(sy.tile_width(x) for x in heads)
    if 16 * h > MAX_TILE:
        raise UnsupportedError(f"{what}: a head dim of {max(heads)} (padded to {h}) does not fit: one tile of 16 x "
                               f"{h} elements exceeds Triton's limit of {MAX_TILE} elements per tile; head dims up "
                               f"to {MAX_TILE // 16} are supported")
    bm, bn = cfg.block_m, cfg.block_n
    while bm > 16 and bm * h > MAX_TILE:
        bm //= 2
    while bn > 16 and bn * h > MAX_TILE:
        bn //= 2
    return cfg if (bm, bn) == (cfg.block_m, cfg.block_n) else dataclasses.replace(cfg, block_m=bm, block_n=bn)


CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535)  # grid x and y of a CUDA launch


def check_grid(grid, device, what: str) -> None:
    """A CUDA launch grid beyond the hardware limits is the call's error (never a CUDA 'invalid argument')."""
    if device.type != "cuda":
        return  # the interpreter has no grid limit
    if grid[0] > CUDA_GRID_LIMITS[0]:
        raise InputError(f"{what}: {grid[0]} row tiles exceed the CUDA grid limit {CUDA_GRID_LIMITS[0]}")
    if grid[1] > CUDA_GRID_LIMITS[1]:
        raise InputError(f"{what}: batch x leading axes = {grid[1]} programs exceed the CUDA grid limit of "
                         f"{CUDA_GRID_LIMITS[1]} in y; split the call along a batch axis")


def launch_extents(sched, dims: dict) -> tuple[int, int, int]:
    """(n, m, head) of a schedule at dims: rows, the longest key extent, the widest head dim."""
    n = sy.evaluate(sched.row[1], dims)
    e = sy.evaluate(sched.col[1], dims)
    mext = max([sy.evaluate(br.extent, dims) for br in sched.branches] + [1])
    heads = [sy.evaluate(br.dot.extent, dims) for br in sched.branches if br.dot is not None] + [e]
    return n, mext, max(heads)


def head_dims(sched, dims: dict) -> list:
    """The head dims of a schedule at dims: every contracted extent, then the value columns."""
    return [sy.evaluate(b.dot.extent, dims) for b in sched.branches if b.dot is not None] + \
        [sy.evaluate(sched.col[1], dims)]


def exact_heads(sched, dims: dict) -> frozenset:
    """The head-dim extents of a schedule equal to their padded tile (max(16, next_pow2)) at these dims: the kernel
    specialised to them loads along those axes without a bound (d = 64, 128 ...)."""
    exts = [b.dot.extent for b in sched.branches if b.dot is not None] + [sched.col[1]]
    out = set()
    for x in exts:
        try:
            v = sy.evaluate(x, dims)
        except KeyError:
            continue
        if v == sy.tile_width(v):
            out.add(x)
    return frozenset(out)


def default_config(sched, device: torch.device, dtype: str, dims: dict, what: str) -> Config:
    """choose_config's table for a call, with tiles shrunk where a huge head dim exceeds Triton's tile limit."""
    n, m, head = launch_extents(sched, dims)
    return fit_tiles(choose_config(device, dtype, n, m, head), head_dims(sched, dims), what)


def row_programs(sched, n: int, block_m: int) -> int:
    """Programs along the grid's first axis: row tiles, or for the residue schedule the tiles of every residue
    (residues r < n mod s hold n // s + 1 rows, the others n // s)."""
    if sched.kind != onf.RESIDUE:
        return cdiv(n, block_m)
    st = sched.lift.stride
    q, rem = divmod(n, st)
    return rem * cdiv(q + 1, block_m) + (st - rem) * cdiv(q, block_m)


def candidates(dtype: str, head: int, default: Config) -> list:
    """Configs tried in order by fit_config: the runtime's default first, then smaller tiles. The fp16/bf16 lists
    keep BLOCK_M >= 64 (wgmma needs M = 64 per warpgroup) until the last resort."""
    if dtype == "float64":
        rest = [Config(32, 32, 4, 1), Config(16, 32, 4, 1), Config(16, 16, 4, 1)]
    elif dtype == "float32":
        rest = [Config(64, 32, 4, 2), Config(64, 32, 4, 1), Config(32, 32, 4, 1), Config(16, 16, 4, 1)]
    elif head <= 64:
        rest = [Config(128, 64, 8, 3), Config(128, 64, 4, 3), Config(64, 64, 4, 3), Config(128, 32, 4, 3),
                Config(64, 32, 4, 2), Config(64, 32, 8, 2), Config(32, 32, 4, 1)]
    else:
        rest = [Config(128, 64, 8, 3), Config(128, 32, 8, 3), Config(64, 64, 8, 2), Config(64, 32, 8, 2),
                Config(64, 64, 4, 2), Config(64, 32, 4, 2), Config(64, 16, 8, 2), Config(32, 32, 4, 1)]
    out = [default]
    for c in rest:
        if c not in out:
            out.append(c)
    return out


def tune_candidates(dtype: str, head: int, default: Config, limit: int = 6) -> list:
    """Configs a GPU times on the first call of a shape bucket (runtime/tune.py), the model's default first: the
    tile shapes, warps and stages that the fused-attention kernels of the Triton tutorials and FlashAttention use
    on Hopper and Ampere for this head dim; at most `limit`."""
    if dtype == "float64":
        rest = [Config(32, 32, 4, 2), Config(64, 32, 4, 1), Config(16, 32, 4, 1)]
    elif dtype == "float32":
        rest = [Config(64, 64, 4, 2), Config(64, 32, 4, 3), Config(128, 32, 8, 2), Config(32, 32, 4, 2)]
    elif head <= 64:
        rest = [Config(128, 128, 8, 3), Config(128, 64, 4, 3), Config(128, 64, 8, 4), Config(64, 64, 4, 3),
                Config(128, 32, 4, 4), Config(64, 128, 4, 3)]
    else:
        rest = [Config(128, 128, 8, 2), Config(128, 64, 8, 2), Config(128, 64, 4, 3), Config(64, 64, 4, 3),
                Config(128, 32, 8, 3), Config(64, 128, 8, 2)]
    out = [default]
    for c in rest:
        if c not in out:
            out.append(c)
    return out[:limit]


@dataclass(frozen=True)
class LinearConfig:
    """Launch config of the chunked linear form: rows per chunk, feature tile, warps and stages of both
    kernels, and the scan's value tile (block_v; 0: the whole padded value width, one value tile)."""
    chunk: int
    block_f: int
    num_warps: int = 4
    num_stages: int = 3
    block_v: int = 0

    def value_tile(self, head_dim_v: int) -> int:
        """BLOCK_V at a padded value width: block_v, or the whole width when 0 or wider."""
        return min(self.block_v, head_dim_v) if self.block_v else head_dim_v

    def text(self) -> str:
        return (f"CHUNK={self.chunk} BLOCK_F={self.block_f}" + (f" BLOCK_V={self.block_v}" if self.block_v else "")
                + f" warps={self.num_warps} stages={self.num_stages}")


@dataclass(frozen=True)
class WindowConfig:
    """Launch config of the window-mixing kernel: query rows per program, warps and stages."""
    block_m: int
    num_warps: int = 4
    num_stages: int = 3

    def text(self) -> str:
        return f"BLOCK_M={self.block_m} warps={self.num_warps} stages={self.num_stages}"


def chunk_config(device: torch.device, n: int, nfeat: int) -> tuple[int, int]:
    """(CHUNK, BLOCK_F): chunk rows and feature tile. On the CPU interpreter, where each program costs
    interpretation overhead, the feature tile grows with D up to 4096 (p = 4, d = 64: 4x faster than 256). On
    CUDA this is the default the launch starts from; the runtime launches the first config that compiles for the device
    without spills (runtime/form_configs.py)."""
    chunk = min(64, sy.tile_width(n))
    return chunk, (min(4096, max(256, next_pow2(nfeat))) if device.type == "cpu" else 64)


def rows_of(n: int) -> int:
    """Rows per program of the linear and window kernels: min(64, next_pow2(n)), at least 16."""
    return min(64, sy.tile_width(n))


def linear_default(n: int) -> LinearConfig:
    """The config the CUDA runtime launched before any AOT check: CHUNK = min(64, next_pow2(n)), BLOCK_F = 64, 4
    warps (runtime/linear_run.py chunk_config), Triton's default 3 stages."""
    return LinearConfig(rows_of(n), 64, 4, 3)


def linear_candidates(n: int) -> list:
    """LinearConfigs tried in order: the default, then 8 warps, then smaller feature tiles and chunks (CHUNK no
    larger than the default's: no chunk longer than the padded sequence). 64-row chunks come first: _chunk_out's
    [CHUNK, BLOCK_F] x [BLOCK_F, HEAD_DIM_V] dot uses wgmma only with 64 rows per warpgroup."""
    cap = rows_of(n)
    out = [linear_default(n)]
    for c, f, w in ((64, 64, 8), (64, 32, 8), (64, 32, 4), (32, 32, 4), (16, 32, 4), (16, 16, 4)):
        cfg = LinearConfig(min(c, cap), f, w, 3)
        if cfg not in out:
            out.append(cfg)
    return out


def linear_tune_configs(n: int, head_dim_v: int = 128) -> list:
    """The linear form's configs a GPU times beside the AOT-fitted one (runtime/plan.py Planner.candidates): 128-row
    chunks, which halve the chunk states the scan writes and the output kernel reads (the linear form's main
    traffic), with feature tiles of 64, 32 and 16 (the larger spill at some head dims: the tuner skips or outtimes
    them); then configs that double the scan's programs (cdiv(D, BLOCK_F) x value tiles x batch x heads, each
    walking the chunks in order: 64 at d = e = 128 and 2 x 16 heads with one value tile, fewer than an H100's 132
    SMs): where the padded value width is over 32, half-width value tiles with 128- and 64-row chunks (which also
    halve the scan's state accumulator), else 64-row chunks with 32-feature tiles; none where a sequence fits in
    one 64-row chunk."""
    if n <= 64:
        return []
    out = [LinearConfig(128, f, 8, 3) for f in (64, 32, 16)]
    if head_dim_v > 32:
        return out + [LinearConfig(128, 64, 8, 3, head_dim_v // 2), LinearConfig(64, 64, 4, 3, head_dim_v // 2)]
    return out + [LinearConfig(64, 32, 8, 3)]


def window_default(n: int) -> WindowConfig:
    """The window kernel's config before any AOT check: BLOCK_M = min(64, next_pow2(n)), 4 warps, 3 stages."""
    return WindowConfig(rows_of(n), 4, 3)


def window_candidates(n: int) -> list:
    cap = rows_of(n)
    out = [window_default(n)]
    for m, w in ((64, 8), (32, 4), (16, 4)):
        cfg = WindowConfig(min(m, cap), w, 3)
        if cfg not in out:
            out.append(cfg)
    return out
