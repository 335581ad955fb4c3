"""Sequence sharding of a DNF: the program one rank runs on its (query shard, key shard) block.

The online-softmax state (m, l, o) is a monoid over the key axis (two states merge by the log-sum-exp rule, in any
grouping of the keys; docs/ring.md), and so is the normalize state (z, acc) (plain sums), so the key axis can be
lifted across ranks: a rank holding the query rows
[row0, row0 + nl) and, at some step of the ring, the keys
[col0, col0 + ml) computes the partial (O, lse) of its rows over those keys, and partials over disjoint key
sets merge with the log-sum-exp rule. This module builds that block program at the DNF level, so that
nothing downstream (ONF, tile analysis, codegen) changes:

  shard-index      <i c> psi O  =>  <i c> psi O_shard with, everywhere in the DNF,
                   i := i + R - 1  and  j := j + C - 1  (global indices: masks and score modifiers see them),
                   except the index position of a sharded read, which stays local:
                   Q[i, k] (query-sharded input) and K[j, k], V[j, c] (key-sharded inputs) keep i, j.
  shard-extent     the output's row extent n and the branch's key extent m become the local lengths
                   (new dims nl, ml); the global n, m stay dims, passed explicitly (bottom-right causal, bias
                   tables of extent 2n - 1, ... read them).
  branch-split     O = E(fin B0, fin B1, ...) (several softmax branches under an epilogue, PiAttention)
                   =>  one block output per branch B_k (each merges on its own: a softmax branch by
                   log-sum-exp, a normalize(...) @ V branch by sums of (z O, z), z its normaliser) and E evaluated
                   on the merged rows (`Epilogue`).

R = row0 + 1 and C = col0 + 1 are new dims (positive, like every dim, so sympy's assumptions hold even for
the first shard, whose offset is 0). The block program's schedule is the ordinary ONF of the rewritten DNF: its
tile-skip formulas are in global indices, so the same interval analysis decides, with the block's whole index
box, whether a (query shard, key shard) pair has any admissible (i, j) at all (`pair_skipped`).

Aligned shards (`aligned`, linear forms across ranks, runtime/ring_linear.py): when a rank's query and key
shards are the same rows, one rank program with i := i + R - 1, j := j + R - 1 (sharded reads local) and a
comparison of two indices shifted alike shifted back (j + R - 1 <= i + R - 1 => j <= i).

Input roles (decided from how the DNF reads each input):
  query    every read indexes one axis (of extent n) by the bare row variable i: the rank passes its rows;
  key      every read indexes one axis (of extent m) by a bare key variable j: the shard travels with K, V;
  both     read by i and by j on the same axis (a document id per token when n = m): the rank passes its
           shard once; a copy named `<name>_kv` travels with the keys (the rank's query and key shards must
           then coincide);
  replicated  anything else (a bias table bias[a, i - j + n - 1], a gate vector wg[k]): every rank passes the
           whole tensor and reads it with global indices.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from . import dnf as D
from . import intervals as iv
from . import ir
from . import symbolic as sy
from .errors import UnsupportedError
from .onf import with_key_sums
from .program import Program

QUERY, KEY, BOTH, REPLICATED = "query", "key", "both", "replicated"
BRANCHES = (D.SoftmaxSum, D.NormSum, D.KeySum)


@dataclass(frozen=True)
class Epilogue:
    """An output computed from several softmax branches: each branch is a block output of its own (merged
    across ranks by log-sum-exp), then `expr` (over lead, i, c; branch k read as `branches[k][lead, i, c]`)
    combines the merged branches on the rank's rows."""
    output: str
    vars: tuple
    extents: tuple            # local extents (row extent nl)
    branches: tuple           # names of the block outputs holding each branch
    expr: object


@dataclass(frozen=True)
class ShardPlan:
    """The block program of a ring and what the driver needs to feed it."""
    program: Program          # the block program (local extents, offset dims)
    outputs: tuple            # its DNF outputs
    roles: dict               # input name -> (role, axis): axis of the input's own shape (None if replicated)
    kv_copies: dict           # input name (role BOTH) -> name of the travelling copy
    n: sp.Symbol              # global query extent (a dim of the original program)
    m: sp.Symbol              # global key extent
    nl: sp.Symbol             # local query length (new dim)
    ml: sp.Symbol             # local key length (new dim)
    r1: sp.Symbol             # row0 + 1 (new dim)
    c1: sp.Symbol             # col0 + 1 (new dim)
    epilogues: tuple = ()     # (Epilogue, ...) for outputs computed from several branches

    def epilogue_of(self, name: str):
        return next((e for e in self.epilogues if e.output == name), None)

    @property
    def output_names(self) -> tuple:
        """The user-visible outputs, in program order."""
        names, seen = [], set()
        for o in self.outputs:
            name = self.owner.get(o.name, o.name)
            if name not in seen:
                seen.add(name)
                names.append(name)
        return tuple(names)

    @property
    def owner(self) -> dict:
        """Block output name -> the user's output it belongs to (itself, or the output of its epilogue)."""
        return {b: e.output for e in self.epilogues for b in e.branches}

    @property
    def key_inputs(self) -> tuple:
        """Block-program inputs that travel around the ring (key shards), in declaration order."""
        out = []
        for node in self.program.inputs:
            name = node.attrs[0]
            role = self.roles.get(name)
            if role is not None and role[0] == KEY:
                out.append(name)
            elif name in self.kv_copies.values():
                out.append(name)
        return tuple(out)

    def source_of(self, block_input: str) -> str:
        """The user's input name a block-program input is taken from."""
        for orig, cp in self.kv_copies.items():
            if cp == block_input:
                return orig
        return block_input

    def block_dims(self, dims: dict, row0: int, nl: int, col0: int, ml: int) -> dict:
        """Dims of one block: the original (global) dims plus the block's lengths and offsets."""
        return {**dims, self.nl.name: nl, self.ml.name: ml, self.r1.name: row0 + 1, self.c1.name: col0 + 1}

    def describe(self) -> str:
        lines = [f"ring shards of {self.program.name}: query axis {self.n}, key axis {self.m}"]
        for name, (role, ax) in self.roles.items():
            where = "" if ax is None else f" (axis {ax})"
            copy = f", travels as {self.kv_copies[name]}" if name in self.kv_copies else ""
            lines.append(f"  {name}: {role}{where}{copy}")
        return "\n".join(lines)


def _extent_symbol(e, what: str) -> sp.Symbol:
    e = sp.sympify(e)
    if not e.is_Symbol:
        raise UnsupportedError(f"ring attention shards the {what} axis, whose extent must be a dim; got "
                               f"{sy.show(e)}")
    return e


def _branch_vars(expr) -> dict:
    """Key variable -> extent of every online-softmax / normalize branch in an expression."""
    return {x.var: sp.sympify(x.extent) for x in D.nodes(expr) if isinstance(x, BRANCHES)}


def _read_role(r: D.Read, shape: tuple, i, n, jvars: set, m):
    """(QUERY, axis) / (KEY, axis) if the read indexes exactly one axis by a bare i / j of the sharded extent and
    no other axis by i or j; None otherwise (the read sees global indices)."""
    tracked = {i} | jvars
    hits = []
    for k, (ix, ext) in enumerate(zip(r.index, shape)):
        ix = sp.sympify(ix)
        if ix == i and sy.prove_equal(ext, n) is True:
            hits.append((QUERY, k))
        elif ix in jvars and sy.prove_equal(ext, m) is True:
            hits.append((KEY, k))
        elif ix.free_symbols & tracked:
            return None
    return hits[0] if len(hits) == 1 else None


def plan(program: Program, outputs) -> ShardPlan:
    """The block program of `program` for ring attention (see the module docstring)."""
    outputs = tuple(outputs)
    if not outputs:
        raise UnsupportedError("ring attention needs a program with an output")
    decl = program.input_map
    ns, ms = set(), set()
    per_out = []
    for o in outputs:
        if len(o.vars) < 2:
            raise UnsupportedError(f"output {o.name}: ring attention needs rows x columns outputs")
        i = o.vars[-2]
        o = replace(o, expr=with_key_sums(o.expr, set(o.vars[:-2]), i, o.vars[-1]))   # sums: partials add
        jv = _branch_vars(o.expr)
        if not jv:
            raise UnsupportedError(f"output {o.name}: no softmax(...) @ V contraction to lift across ranks")
        n = _extent_symbol(o.extents[-2], f"query (rows of {o.name})")
        for ext in set(jv.values()):
            ms.add(_extent_symbol(ext, f"key (contraction of {o.name})"))
        ns.add(n)
        per_out.append((o, i, set(jv)))
    if len(ns) != 1 or len(ms) != 1:
        raise UnsupportedError("ring attention needs one query extent and one key extent across outputs, got "
                               f"{sorted(map(str, ns))} and {sorted(map(str, ms))}")
    n, m = ns.pop(), ms.pop()
    roles = _roles(decl, per_out, n, m)
    if not any(r[0] in (KEY, BOTH) for r in roles.values()):
        raise UnsupportedError("ring attention: no input is indexed by the key axis, nothing to rotate")
    fresh = _fresh_names(program, per_out)
    nl, ml = sy.dim(fresh("n_local")), sy.dim(fresh("m_local"))
    r1, c1 = sy.dim(fresh("row0_1")), sy.dim(fresh("col0_1"))
    kv_copies = {name: fresh(f"{name}_kv") for name, (role, _) in roles.items() if role == BOTH}

    inputs = _resized_inputs(program, roles, lambda role: nl if role in (QUERY, BOTH) else ml)
    for node in program.inputs:
        name = node.attrs[0]
        if name in kv_copies:
            shape = list(node.shape)
            shape[roles[name][1]] = ml
            inputs.append(ir.input_(kv_copies[name], tuple(shape), node.dtype, node.loc))

    new_outputs, epilogues = [], []
    for o, i, jv in per_out:
        gmap = {i: i + r1 - 1, **{j: j + c1 - 1 for j in jv}}
        expr = _rewrite(o.expr, gmap, roles, kv_copies, decl, i, n, jv, m, ml)
        exts = (*o.extents[:-2], nl, o.extents[-1])
        if isinstance(expr, BRANCHES):
            new_outputs.append(replace(o, extents=exts, expr=expr))
            continue
        # branch-split: O = E(fin B0, fin B1, ...) => each B_k its own block output, E on the merged rows
        branches: list = []

        def lift(x, o=o, exts=exts, branches=branches):
            if isinstance(x, BRANCHES):
                name = fresh(f"{o.name}_branch{len(branches)}")
                branches.append(name)
                new_outputs.append(D.DnfOutput(name, o.vars, exts, x, o.dtype))
                return D.Read(name, tuple(o.vars), o.dtype)
            kids = D.children(x)
            return D.with_children(x, [lift(k) for k in kids]) if kids else x

        epi = lift(expr)
        epilogues.append(Epilogue(o.name, o.vars, exts, tuple(branches), epi))
    # the block program's outputs: one placeholder node per block output with the local shape, carrying every
    # runtime guard of the original program (n == m ...), which binding checks with the global dims
    orig = dict(program.outputs)
    owner = {b: e.output for e in epilogues for b in e.branches}
    block = _rank_program(program, "ring_block", (nl, ml, r1, c1), inputs, nl,
                          [(o.name, orig[owner.get(o.name, o.name)]) for o in new_outputs])
    return ShardPlan(block, tuple(new_outputs), roles, kv_copies, n, m, nl, ml, r1, c1, tuple(epilogues))


def _roles(decl, per_out, n, m) -> dict:
    """Input name -> (role, axis) from how the outputs read it (module docstring)."""
    seen: dict = {name: set() for name in decl}
    for o, i, jv in per_out:
        for x in D.nodes(o.expr):
            if isinstance(x, D.Read):
                seen[x.name].add(_read_role(x, decl[x.name].shape, i, n, jv, m))
    roles = {}
    for name, rs in seen.items():
        axes = {r[1] for r in rs if r is not None}
        kinds = {r[0] for r in rs if r is not None}
        if not rs or None in rs or len(axes) != 1:
            roles[name] = (REPLICATED, None)
        elif kinds == {QUERY}:
            roles[name] = (QUERY, axes.pop())
        elif kinds == {KEY}:
            roles[name] = (KEY, axes.pop())
        else:
            roles[name] = (BOTH, axes.pop())
    return roles


def _fresh_names(program, per_out):
    """A generator of names not used by the program (dims, params, inputs, bindings, DNF variables)."""
    taken = {d.name for d in program.dims} | {p for p, _ in program.params} | set(program.input_map)
    taken |= {nm for nm, _ in program.bindings}
    for o, _, _ in per_out:
        taken |= {v.name for x in D.nodes(o.expr) if isinstance(x, D.BINDERS) for v in [x.var]}
        taken |= {v.name for v in o.vars}

    def fresh(base):
        name, k = base, 1
        while name in taken:
            name, k = f"{base}{k}", k + 1
        taken.add(name)
        return name
    return fresh


# ---- aligned shards: the rank's query and key shards coincide (linear forms across ranks) --------------------

@dataclass(frozen=True)
class AlignedPlan:
    """The program one rank runs on its own rows when its query and key shards coincide (rows [row0, row0 + nl)
    of an axis n shared by queries and keys): every sharded axis has the local extent nl, indices are global
    (i := i + R - 1, j := j + R - 1) except the sharded index of a sharded read, and comparisons of two indices
    both shifted by R - 1 are shifted back (j + R - 1 <= i + R - 1  =>  j <= i: the causal mask stays the one
    the linear form is derived for)."""
    program: Program
    outputs: tuple
    roles: dict               # input name -> (role, axis), as in ShardPlan
    n: sp.Symbol              # global extent of the shared axis
    nl: sp.Symbol             # local length (new dim)
    r1: sp.Symbol             # row0 + 1 (new dim)

    def block_dims(self, dims: dict, row0: int, nl: int) -> dict:
        return {**dims, self.nl.name: nl, self.r1.name: row0 + 1}


def aligned(program: Program, outputs) -> AlignedPlan:
    """The AlignedPlan of `program` (see the class): the rank-local program of linear forms across ranks."""
    outputs = tuple(outputs)
    decl = program.input_map
    per_out, ns = [], set()
    for o in outputs:
        if len(o.vars) < 2:
            raise UnsupportedError(f"output {o.name}: ring attention needs rows x columns outputs")
        i = o.vars[-2]
        jv = _branch_vars(o.expr)
        n = _extent_symbol(o.extents[-2], f"query (rows of {o.name})")
        if not jv or any(sy.prove_equal(x, n) is not True for x in jv.values()):
            raise UnsupportedError(f"output {o.name}: linear forms across ranks need keys on the query axis {n}")
        ns.add(n)
        per_out.append((o, i, set(jv)))
    if len(ns) != 1:
        raise UnsupportedError(f"ring attention needs one sequence extent across outputs, got {sorted(map(str, ns))}")
    n = ns.pop()
    roles = _roles(decl, per_out, n, n)
    fresh = _fresh_names(program, per_out)
    nl, r1 = sy.dim(fresh("n_local")), sy.dim(fresh("row0_1"))
    inputs = _resized_inputs(program, roles, lambda role: nl)
    new_outputs = []
    for o, i, jv in per_out:
        gmap = {i: i + r1 - 1, **{j: j + r1 - 1 for j in jv}}
        expr = _unshift(_rewrite(o.expr, gmap, roles, {}, decl, i, n, jv, n, nl), r1 - 1)
        new_outputs.append(replace(o, extents=(*o.extents[:-2], nl, o.extents[-1]), expr=expr))
    prog = _rank_program(program, "ring_rank", (nl, r1), inputs, nl, program.outputs)
    return AlignedPlan(prog, tuple(new_outputs), roles, n, nl, r1)


_COMPARISONS = ("lt", "le", "gt", "ge", "eq", "ne")


def _unshift(e, shift):
    """a + shift (op) b + shift  =>  a (op) b, for two indices (an identity: both sides move together)."""
    if isinstance(e, D.Op) and e.fn in _COMPARISONS and all(isinstance(a, D.Index) for a in e.args):
        new = [sp.expand(sp.sympify(a.expr) - shift) for a in e.args]
        syms = shift.free_symbols
        if all(not (x.free_symbols & syms) for x in new):
            return replace(e, args=tuple(replace(a, expr=x) for a, x in zip(e.args, new)))
        return e
    kids = D.children(e)
    return D.with_children(e, [_unshift(k, shift) for k in kids]) if kids else e


def epilogue_program(plan: ShardPlan, ep: Epilogue) -> Program:
    """The program an epilogue is evaluated in: the block program's rank-local inputs plus one input per branch
    (the merged rows of that branch)."""
    keep = [nd for nd in plan.program.inputs if plan.roles.get(nd.attrs[0], (KEY,))[0] != KEY]
    extra = [ir.input_(b, tuple(ep.extents), ir.FLOAT) for b in ep.branches]
    return replace(plan.program, name=f"{plan.program.name}_{ep.output}_epilogue", inputs=tuple(keep + extra))


def _rewrite(e, gmap, roles, kv_copies, decl, i, n, jv, m, ml):
    """shard-index and shard-extent (module docstring) applied to one expression."""
    if isinstance(e, D.Read):
        role, ax = roles[e.name]
        rr = _read_role(e, decl[e.name].shape, i, n, jv, m)
        local = None
        name = e.name
        if rr is not None and role != REPLICATED:
            if rr[0] == QUERY and role in (QUERY, BOTH):
                local = rr[1]
            elif rr[0] == KEY and role in (KEY, BOTH):
                local = rr[1]
                name = kv_copies.get(e.name, e.name)
        index = tuple(sp.sympify(x) if k == local else sp.sympify(x).xreplace(gmap) for k, x in enumerate(e.index))
        return replace(e, name=name, index=index)
    if isinstance(e, D.Index):
        return replace(e, expr=e.expr.xreplace(gmap))
    if isinstance(e, (D.SoftmaxAt, D.NormalizeAt)):
        e = replace(e, target=sp.sympify(e.target).xreplace(gmap))
    if isinstance(e, BRANCHES) and e.var in jv:
        e = replace(e, extent=ml)
    kids = D.children(e)
    if not kids:
        return e
    return D.with_children(e, [_rewrite(k, gmap, roles, kv_copies, decl, i, n, jv, m, ml) for k in kids])


def pair_skipped(schedule, dims: dict) -> bool:
    """True if the block (every local row x every local key) has no admissible (i, j) in any branch: the tile
    analysis of the block schedule evaluated on the block's whole index box. Conservative: a formula that does
    not evaluate to true (data-dependent masks, leading indices) never skips."""
    nl = sy.evaluate(schedule.row[1], dims)
    if nl == 0:
        return True
    for b in schedule.branches:
        ml = sy.evaluate(b.extent, dims)
        if ml == 0:
            continue
        box = {iv.I_LO: 0, iv.I_HI: nl - 1, iv.J_LO: 0, iv.J_HI: ml - 1}
        if _true(b.skip, box, dims):
            continue
        lo = 0 if b.key_lo is None else _value(sp.Max(0, b.key_lo), box, dims)
        hi = ml - 1 if b.key_hi is None else _value(sp.Min(ml - 1, b.key_hi), box, dims)
        if lo is not None and hi is not None and lo > hi:
            continue
        return False
    return True


def _subs(e, box, dims):
    e = sp.sympify(e)
    vals = {}
    for s in e.free_symbols:
        if s in box:
            vals[s] = sp.Integer(box[s])
        elif s.name in dims:
            vals[s] = sp.Integer(dims[s.name])
    return e.xreplace(vals)


def _true(formula, box, dims) -> bool:
    return _subs(formula, box, dims) is sp.true


def _value(e, box, dims):
    v = _subs(e, box, dims)
    return int(v) if v.is_Integer else None


def _resized_inputs(program, roles: dict, extent) -> list:
    """The program's inputs with each sharded input's axis resized to extent(role) (replicated ones kept)."""
    out = []
    for node in program.inputs:
        name = node.attrs[0]
        role, ax = roles[name]
        if role == REPLICATED:
            out.append(node)
            continue
        shape = list(node.shape)
        shape[ax] = extent(role)
        out.append(ir.input_(name, tuple(shape), node.dtype, node.loc))
    return out


def _rank_program(program, suffix: str, new_dims: tuple, inputs: list, nl, outputs) -> object:
    """The program one rank compiles: the resized inputs, the extra dims (local length, global offsets ...), and
    per (name, original output node) a placeholder output of nl rows carrying every runtime guard of the original
    program (n == m ...), which binding checks with the global dims."""
    guards = program.guards()
    outs = tuple((name, ir.Node("input", (), (*node.shape[:-2], nl, node.shape[-1]), node.dtype, (name,), node.loc,
                                guards)) for name, node in outputs)
    return replace(program, name=f"{program.name}_{suffix}", dims=(*program.dims, *new_dims), inputs=tuple(inputs),
                   outputs=outs)
