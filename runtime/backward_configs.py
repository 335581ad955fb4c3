"""Launch configs of the fused backward kernels on a GPU: per kernel (dK/dV, dQ), the first candidate (tiles, warps,
stages) that compiles ahead of time for the target without register spills and within its shared memory
(runtime/aot.py), as the forward chooses its config. The dK/dV kernel holds two accumulators of a key tile by the
head dims, so at d = 128 it needs smaller query tiles than at d = 64."""
from __future__ import annotations

from moa import symbolic as sy

from . import cache
from .aot_batch import TRITON_TYPE, aot_groups, choose_fitting, kernel_signature
from .configs import summary_types
from .tiling import Config

CANDIDATES = (Config(64, 64, 4, 2), Config(32, 64, 8, 2), Config(32, 64, 4, 2), Config(32, 32, 8, 2),
              Config(32, 32, 4, 2), Config(16, 32, 8, 2), Config(16, 32, 4, 2), Config(16, 16, 4, 2))


def constexprs(spec, dims: dict, cfg: Config) -> dict:
    """The constexprs of a launch: tiles and the head dims padded to powers of two (at least 16)."""
    out = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
           "HEAD_DIM_V": sy.tile_width(int(sy.evaluate(spec.col_extent, dims)))}
    out.update({hd: sy.tile_width(int(sy.evaluate(x, dims))) for hd, x in spec.head_dims})
    return out


def request(program, spec, kernel, dtype: str, dims: dict, cfg: Config, target: str,
            index_dtype: str = "int32") -> dict:
    """A picklable AOT request (runtime/aot_batch.py) for one backward kernel in one config."""
    path = cache.store(cache.key_of(spec.source, "aot-backward"), spec.source)
    consts = constexprs(spec, dims, cfg)
    acc = "fp64" if dtype == "float64" else "fp32"
    special = {f"{b}_ptr": f"*{acc}" for b in ("lse", "delta", "dQ", "dK", "dV")}
    special["dO_ptr"] = f"*{TRITON_TYPE[dtype]}"
    special.update(summary_types(program, spec, index_dtype, consts))   # the data's per-tile (min, max)
    sig = kernel_signature(program, spec.source, kernel.name, dtype, index_dtype, consts, special)
    return {"file": str(path), "kernel": kernel.name, "signature": sig, "constexprs": consts, "target": target,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "block_m": cfg.block_m,
            "block_n": cfg.block_n}


def choose(program, spec, dtype: str, dims: dict, target: str = "sm_90") -> dict:
    """Kernel name -> (Config, AotReport) of the first candidate that fits `target`, per backward kernel; an
    UnsupportedError naming every config tried when none does."""
    groups = [[request(program, spec, k, dtype, dims, c, target) for c in CANDIDATES] for k in spec.kernels]
    results = aot_groups(groups, first_fit=True)
    out = {}
    for k, res in zip(spec.kernels, results):
        out[k.name] = choose_fitting(list(CANDIDATES[:len(res)]), res, target, f"the backward kernel {k.name}")
    return out
