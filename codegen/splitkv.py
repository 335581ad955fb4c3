"""Split-KV (flash-decoding) and variable-length launches of a block kernel, as Triton text.

The block program of a kernel (moa/shard.py: the DNF with the key axis lifted, j := j + C - 1, and the row axis
i := i + R - 1, with local extents n_local, m_local) is emitted by codegen/emit.py like any other program. This
module adds one kernel, `_attn_grid`, that runs the block kernel `_attn_fwd` (inlined: a jit function calling
another) for every (query tile, batch x head, sequence x key split) of a third grid axis:

  split s of NSPLIT      keys [K0 + s L, min(K0 + (s + 1) L, m)) of its sequence, L = SPLIT_LEN (a multiple of
                         BLOCK_N), K0 = KEY0 the first tile any row admits (0 but for a single sequence):
                         the key inputs' pointers move to key s L, m_local = the split's length, C = s L + 1; the
                         output and lse pointers move to the split's partial (O_s, lse_s).
  sequence b (VARLEN)    rows [cu_q[b], cu_q[b + 1]) of the packed query inputs and output, keys
                         [cu_k[b], cu_k[b + 1]) of the packed key inputs; the sequence's lengths are its dims.
                         VARLEN_PAGED: its keys are pages of a pool instead, split s (a page) at
                         block_table[b, s] x SPLIT_LEN.

The partials (O_s, lse_s) over disjoint key sets are merged by `_merge_splits` with the log-sum-exp rule of the
online-softmax monoid (the algebra of ring attention, runtime/ring.py): M = max_s lse_s,
O = sum_s e^(lse_s - M) O_s / sum_s e^(lse_s - M), lse = M + log(sum_s e^(lse_s - M)); a normalize(A) @ V output's
partials (O_s, z_s) merge by sums: O = sum_s z_s O_s / sum_s z_s. Splits or rows with no admissible key contribute
nothing (lse -inf, z 0), and a row with none at all is 0, as in one launch.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from moa.errors import UnsupportedError

GRID_KERNEL = "_attn_grid"
MERGE_KERNEL = "_merge_splits"


@dataclass(frozen=True)
class Layout:
    """What the grid kernel moves per split and per sequence, in codegen names.

    query: input -> axis of its own shape indexed by the row (offset by the sequence's first row);
    key: input -> axis indexed by the key (offset by the sequence's first key plus the split's);
    lead: the output's leading extents (heads) after the batch axes; dims: the dim names the kernel overrides,
    (n, m, n_local, m_local, row0_1, col0_1), n and m None when they are not overridden (fixed split)."""
    query: dict
    key: dict
    nbatch: int
    nlead: int
    dims: tuple


def signature(source: str) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of the parameters of `_attn_fwd`, in order."""
    m = re.search(r"def _attn_fwd\(\n(.*?)\n\):", source, re.S)
    if m is None:
        raise UnsupportedError("split-KV: the generated kernel has no _attn_fwd signature (a bug of moa's)")
    out = []
    for line in m.group(1).splitlines():
        text = line.strip().rstrip(",")
        out.append((text.split(":")[0].strip(), text.endswith("tl.constexpr")))
    return out


def input_params(params: list, inputs: tuple, ranks: dict, nbatch: int) -> dict:
    """input -> (pointer parameter, [stride parameters of its own axes]) read positionally from the signature
    (each input passes its pointer, its batch strides, then one stride per axis)."""
    out, pos = {}, 0
    for name in inputs:
        ptr = params[pos]
        strides = params[pos + 1 + nbatch: pos + 1 + nbatch + ranks[name]]
        out[name] = (ptr, strides)
        pos += 1 + nbatch + ranks[name]
    return out


VARLEN, SPLIT, LENGTHS, PAGED, VARLEN_PAGED = "varlen", "split", "lengths", "paged", "varlen_paged"
VARLENS = (VARLEN, VARLEN_PAGED)   # packed sequences: the third grid axis is (sequence, key split)


def _prologue(mode: str, shared: bool) -> tuple[list, list]:
    """(lines computing the program's sequence, lengths and key offsets; the extra parameters they read)."""
    body = ["    pid = tl.program_id(2)", "    split = pid % NSPLIT",
            "    c0 = KEY0 + split * SPLIT_LEN" if mode == SPLIT else "    c0 = split * SPLIT_LEN"]
    if mode in VARLENS:
        body += ["    seq = pid // NSPLIT",
                 "    q0 = tl.load(cu_q + seq).to(tl.int64)",
                 "    nq = (tl.load(cu_q + seq + 1) - q0).to(tl.int32)",
                 "    k0 = tl.load(cu_k + seq).to(tl.int64)",
                 "    mk = (tl.load(cu_k + seq + 1) - k0).to(tl.int32)"]
        extra = ["cu_q", "cu_k"]
        if mode == VARLEN:
            body.append("    koff = k0 + c0")
        else:   # split s of sequence seq reads page block_table[seq, s] of the pool
            body.append("    koff = tl.load(block_table + seq * stride_table + split).to(tl.int64) * SPLIT_LEN")
            extra += ["block_table", "stride_table"]
    else:
        body.append("    nq = NQ")
        extra = ["NQ", "MK", "ROW0"] + (["KEY0"] if mode == SPLIT else [])
        if mode == SPLIT:
            body += ["    mk = MK", "    koff = c0.to(tl.int64)"]
        else:   # the valid length (and the block table) of this program's batch index
            body += ["    zb = tl.program_id(1) // LEADS",
                     "    mk = tl.minimum(tl.load(cache_len + zb).to(tl.int32), MK)"]
            extra += ["LEADS", "cache_len"]
            if mode == PAGED:
                body.append("    koff = tl.load(block_table + zb * stride_table + split).to(tl.int64) * SPLIT_LEN")
                extra += ["block_table", "stride_table"]
            else:
                body.append("    koff = c0.to(tl.int64)")
    if mode != SPLIT:
        body.append("    row0 = mk - nq" if shared else "    row0 = 0")
    else:
        body.append("    row0 = ROW0")
    body.append("    ml = tl.minimum(mk - c0, SPLIT_LEN)")
    # a varlen program past its sequence's row tiles exits (the residue schedule, whose programs are not row
    # tiles, is refused for varlen by the runtime)
    body.append("    if (tl.program_id(0) * BLOCK_M < nq) & (ml > 0):" if mode in VARLENS else "    if ml > 0:")
    return body, extra


# long: one template filled from the signature; the moved pointers and overridden dims read top to bottom
def grid_source(spec, ranks: dict, layout: Layout, mode: str) -> str:
    """The block kernel's source with `_attn_grid` appended (see the module docstring). mode: SPLIT (key splits
    of one sequence), VARLEN (packed sequences, cu_seqlens), LENGTHS (a valid length per batch index),
    PAGED (LENGTHS, and split s of batch index b reads page block_table[b, s] of SPLIT_LEN keys), VARLEN_PAGED
    (VARLEN with the keys of sequence b in pages: split s reads page block_table[b, s])."""
    if getattr(spec, "descriptors", ()):
        raise UnsupportedError("split-KV and varlen launches read key tiles through pointers, not TMA "
                               "descriptors (a bug of moa's: the runtime plans them without TMA)")
    sig = signature(spec.source)
    params = [n for n, c in sig if not c]
    consts = [n for n, c in sig if c]
    ins = input_params(params, spec.inputs, ranks, layout.nbatch)
    after = params.index(ins[spec.inputs[-1]][0]) + 1 + layout.nbatch + ranks[spec.inputs[-1]] if spec.inputs \
        else 0   # a kernel that reads no input (its mask admits no key) starts with its output
    tiles = {}   # per-tile summaries: pointer -> (axis, stride of the tiled axis)
    for ts in spec.summaries:
        tiles[params[after]] = (ts.axis, params[after + 1 + layout.nbatch + ts.pos])
        after += 2 + layout.nbatch + ts.rank
    o_ptr = params[after]
    o_row = params[after + 1 + layout.nbatch + layout.nlead]
    lse_ptr = params[after + 2 + layout.nbatch + layout.nlead + 1]
    dim_param = {d: params[params.index(lse_ptr) + 1 + layout.nbatch + layout.nlead + k]
                 for k, d in enumerate(spec.dims)}
    n, m, nl, ml, r1, c1 = layout.dims
    varlen = mode in VARLENS
    body, extra = _prologue(mode, n == m)
    args = []
    for p in params:
        moved = None
        for name, (ptr, strides) in ins.items():
            if p == ptr and name in layout.query and varlen:
                moved = f"{p} + q0 * {strides[layout.query[name]]}"
            elif p == ptr and name in layout.key:
                moved = f"{p} + koff * {strides[layout.key[name]]}"
        if p in tiles:
            moved = _summary_move(p, *tiles[p], mode)
        if p == o_ptr:
            moved = f"{p} + split.to(tl.int64) * stride_O_split" + (f" + q0 * {o_row}" if varlen else "")
        elif p == lse_ptr:
            moved = f"{p} + split.to(tl.int64) * lse_stride_split" + (" + q0" if varlen else "")
        for d, val in ((n, "nq" if n != m else "mk"), (m, "mk"), (nl, "nq"), (ml, "ml"), (r1, "row0 + 1"),
                       (c1, "c0 + 1")):
            if d is not None and dim_param.get(d) == p and (mode != SPLIT or d not in (n, m)):
                moved = val
        args.append(moved or p)
    args += [f"{c}={c}" for c in consts]
    body.append(f"        _attn_fwd({', '.join(args)})")
    head = [f"    {p}," for p in params + ["stride_O_split", "lse_stride_split"] + extra + ["SPLIT_LEN"]]
    head += [f"    {c}: tl.constexpr," for c in consts + ["NSPLIT"]]
    kernel = ["", "", "@triton.jit", f"def {GRID_KERNEL}(", *head, "):",
              "    # the block kernel on one (query tile, batch x head, sequence x key split)", *body, ""]
    return spec.source.rstrip("\n") + "\n" + "\n".join(kernel)


def _summary_move(p: str, axis: str, stride: str, mode: str) -> str | None:
    """The moved pointer of a per-tile summary argument. A key split or page is whole key tiles: its summaries
    start at its first tile. Paged key summaries are in each batch index's logical key order (the runtime gathers
    them through the block table, runtime/decode_summaries.py), so a page's start at its logical first tile c0.
    Varlen summaries are computed per sequence (runtime/summaries.packed_tile_summaries; paged: over the keys
    gathered from the pages): sequence `seq`'s tiles start at tile first_row // BLOCK + seq of the packed
    summaries (no two overlap), a key split's at its sequence's start plus its first tile; row summaries of a
    single sequence do not move."""
    if axis == "key":
        if mode in VARLENS:
            return f"{p} + (k0 // BLOCK_N + seq + c0 // BLOCK_N) * {stride}"
        return f"{p} + (c0 // BLOCK_N) * {stride}" if mode == PAGED else f"{p} + (koff // BLOCK_N) * {stride}"
    return f"{p} + (q0 // BLOCK_M + seq) * {stride}" if mode in VARLENS else None


MERGE_SOURCE = '''# Generated by moa: the merge of split-KV partials (codegen/splitkv.py).
import triton
import triton.language as tl


@triton.jit
def _merge_splits(
    O_part, stride_O_s, stride_O_r, lse_part, stride_l_s, O_out, stride_out_r, lse_out,
    rows, dim_e, nsplit,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, NORM: tl.constexpr, DIVIDE: tl.constexpr,
):
    # log-sum-exp merge of (O_s, lse_s) over the splits s (NORM: sums of (z_s O_s, z_s); not DIVIDE: a plain
    # sum, whose partials (O_s, 1) add up)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_r < rows
    tile_ok = row_ok[:, None] & (offs_e[None, :] < dim_e)
    top = tl.full([BLOCK_R], float("-inf"), dtype=lse_part.dtype.element_ty)
    if not NORM:
        for s in range(nsplit):
            top = tl.maximum(top, tl.load(lse_part + s * stride_l_s + offs_r, mask=row_ok, other=float("-inf")))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    den = tl.zeros([BLOCK_R], dtype=lse_part.dtype.element_ty)
    acc = tl.zeros([BLOCK_R, BLOCK_E], dtype=lse_part.dtype.element_ty)
    for s in range(nsplit):
        if NORM:
            w = tl.load(lse_part + s * stride_l_s + offs_r, mask=row_ok, other=0.0)
        else:
            w = tl.exp(tl.load(lse_part + s * stride_l_s + offs_r, mask=row_ok, other=float("-inf")) - top_safe)
        o = tl.load(O_part + s * stride_O_s + offs_r[:, None] * stride_O_r + offs_e[None, :], mask=tile_ok,
                    other=0.0)
        acc += tl.where(w[:, None] != 0, o * w[:, None], 0.0)
        den += w
    ok = den != 0
    if DIVIDE:
        out = tl.where(ok[:, None], acc / tl.where(ok, den, 1.0)[:, None], 0.0)
    else:
        out = acc
    tl.store(O_out + offs_r[:, None] * stride_out_r + offs_e[None, :], out.to(O_out.dtype.element_ty),
             mask=tile_ok)
    if NORM:
        total = den
    else:
        total = tl.where(ok, top_safe + tl.log(tl.where(ok, den, 1.0)), float("-inf"))
    tl.store(lse_out + offs_r, total, mask=row_ok)
'''


BRANCHES_KERNEL = "_attn_branches"
LAUNCH_OPTIONS = ("num_warps", "num_stages")   # launch options, not constexprs of the kernel


def branches_source(sources: list) -> str:
    """One kernel `_attn_branches` running the grid kernels of several block outputs (the branches of one
    epilogue) in one launch: their grids' third axes laid end to end; a program at pid2 in [NP_k, NP_k+1) runs
    branch k's `_attn_grid` (renamed _attn_grid_b<k>, its block kernel _attn_fwd_b<k>) as program pid2 - NP_k.
    Arguments: every branch's grid arguments (prefixed b<k>_), the offsets NP1 .. NP_B-1, then each branch's
    constexprs (b<k>_NAME)."""
    out, defined, calls, head, consts = [], set(), [], [], []
    for k, src in enumerate(sources):
        src = re.sub(r"\b(_attn_fwd|_attn_grid)\b", rf"\1_b{k}", src)
        src = src.replace("    pid = tl.program_id(2)\n", "    pid = tl.program_id(2) - PID0\n")
        src = src.replace(f"def {GRID_KERNEL}_b{k}(\n", f"def {GRID_KERNEL}_b{k}(\n    PID0,\n")
        lines = src.splitlines()
        for node in ast.parse(src).body:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
            name = node.name if isinstance(node, ast.FunctionDef) else ast.unparse(node)
            if name in defined:   # an import or a helper another branch's module defined already
                continue
            defined.add(name)
            out.append("\n".join(lines[start:node.end_lineno]))
        m = re.search(rf"def {GRID_KERNEL}_b{k}\(\n    PID0,\n(.*?)\n\):", src, re.S)
        params = [ln.strip().rstrip(",") for ln in m.group(1).splitlines()]
        plain = [p for p in params if not p.endswith("tl.constexpr")]
        const = [p.split(":")[0].strip() for p in params if p.endswith("tl.constexpr")]
        head += [f"    b{k}_{p}," for p in plain]
        consts += [f"    b{k}_{c}: tl.constexpr," for c in const]
        args = ", ".join(["0" if k == 0 else f"NP{k}", *[f"b{k}_{p}" for p in plain],
                          *[f"{c}=b{k}_{c}" for c in const]])
        test = "if" if k == 0 else "elif" if k < len(sources) - 1 else "else"
        cond = f" pid2 < NP{k + 1}:" if test != "else" else ":"
        calls += [f"    {test}{cond}", f"        {GRID_KERNEL}_b{k}({args})"]
    head += [f"    NP{k}," for k in range(1, len(sources))]
    kernel = ["@triton.jit", f"def {BRANCHES_KERNEL}(", *head, *consts, "):",
              "    # the branches' grid kernels in one launch", "    pid2 = tl.program_id(2)", *calls]
    return "# Generated by moa: the grid kernels of several branches in one launch (codegen/splitkv.py).\n" + \
        "\n\n\n".join(out + ["\n".join(kernel)]) + "\n"
