"""Binding call-time tensors to a program: dims from shapes, batch axes, dtypes, devices, guards."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import sympy as sp
import torch
from torch.autograd import forward_ad

from moa import ir
from moa import dnf as D
from moa import intervals as iv
from moa import symbolic as sy
from moa.errors import InputError, UnsupportedError
from moa.exprfold import np_eval
from moa.program import Program

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class Binding:
    """The call's facts: dim values, the broadcast batch shape, the float dtype and the device."""

    dims: dict            # name -> int
    batch: tuple          # leading batch shape shared by all inputs
    dtype: torch.dtype    # float dtype of the call
    device: torch.device
    tensors: dict         # name -> tensor, batch axes broadcast (views, not copies)

    @property
    def env(self) -> dict:
        return dict(self.dims)


INT32_MAX = 2 ** 31 - 1


def check_offsets(program: Program, b: Binding) -> None:
    """Refuse a call whose element offsets exceed what the generated kernels index with.

    Kernels add batch offsets in 64-bit integers, but compute the offsets inside one batch item (program axes:
    rows, keys, head dims and leading program axes) in 32-bit integers, so sum_k (size_k - 1) * |stride_k|
    over an input's program axes must stay <= 2^31 - 1, and so must rows * columns - 1 of every output
    (allocated contiguous). Computed from shapes and strides only: nothing is allocated or read."""
    for name, node in program.input_map.items():
        t = b.tensors[name]
        shape, strides = t.shape[t.dim() - node.rank:], t.stride()[t.dim() - node.rank:]
        if 0 in shape:
            continue
        span = sum((s - 1) * abs(st) for s, st in zip(shape, strides))
        if span > INT32_MAX:
            raise InputError(f"input {name}: element offsets within one batch item reach {span} > 2^31 - 1 "
                             f"(shape {_shape_text(shape)}, strides {_shape_text(strides)}); generated kernels "
                             f"index within a batch item with 32-bit integers: split the call along a batch axis"
                             + (" or pass a contiguous tensor" if not t.is_contiguous() else ""))
    for name, node in program.outputs:
        if node.rank < 2:
            continue
        rows, cols = (int(sy.evaluate(e, b.dims)) for e in node.shape[-2:])
        if rows > 0 and cols > 0 and rows * cols - 1 > INT32_MAX:
            raise InputError(f"output {name} would have {rows} x {cols} elements per batch item, more than "
                             f"2^31 offsets; generated kernels index within a batch item with 32-bit integers: "
                             f"split the call along a batch axis")


def check_reads(program: Program, outputs, b: Binding) -> None:
    """Refuse a call in which an unguarded read (no `where` around it) indexes outside its input, as the float64
    reference does (the kernels' masked loads would read 0 there). Decided from the index intervals over the
    read's whole index space at the call's dims (moa/intervals.py: exact for affine indices); a read the
    analysis cannot bound is left to the kernel."""
    for out in outputs:
        for read, ranges in D.unguarded_reads(out):
            node = program.input_map.get(read.name)
            if node is None:
                continue
            try:
                box = iv.Box({v: (sp.Integer(0), sp.sympify(sy.evaluate(x, b.dims)) - 1) for v, x in ranges.items()})
                if any(int(hi) < int(lo) for lo, hi in box.ranges.values()):
                    continue          # an empty index space: nothing is read
                for k, (idx, ext) in enumerate(zip(read.index, node.shape)):
                    at_dims = iv.spread_minmax(sp.sympify(idx).xreplace({d: sp.Integer(v)
                                                                        for d, v in _dim_syms(program, b)}))
                    r = iv.interval(at_dims, box)
                    if r is None:
                        continue
                    lo, hi = (sp.sympify(x).xreplace({d: sp.Integer(v) for d, v in _dim_syms(program, b)})
                              for x in r)
                    if not (lo.is_Integer and hi.is_Integer):
                        continue
                    n = int(sy.evaluate(ext, b.dims))
                    exact = _affine(at_dims)
                    if (int(lo) < 0 or int(hi) > n - 1) and not exact:   # bounds of Min / Max may not be reached
                        lo, hi, exact = _exact_range(at_dims, box, lo, hi)
                    if (int(lo) < 0 or int(hi) > n - 1) and not exact and at_dims.has(sp.Piecewise):
                        lo, hi = _piecewise_range(sp.piecewise_fold(at_dims), box, lo, hi)
                    if int(lo) < 0 or int(hi) > n - 1:
                        at = int(lo) if int(lo) < 0 else int(hi)
                        shown = ", ".join(sy.show(x) if a == k else ":" for a, x in enumerate(read.index))
                        uses = {d.name for d in sp.sympify(idx).free_symbols} & set(b.dims)
                        fix = ("the dims must make it stay inside (a grouped head a // (h // g) needs h a multiple "
                               "of g), or guard the read with where(...)" if uses and sp.sympify(idx).has(sp.floor)
                               else "guard the read with where(...)")
                        raise InputError(
                            f"index out of range: the read {read.name}[{shown}] "
                            f"{'reaches' if exact else 'may reach (by interval bounds)'} index {at} on axis {k} "
                            f"(extent {n}: 0..{n - 1}) at the call's dims ({_dims_text(b.dims)}); {fix}")
            except (TypeError, ValueError):
                continue


def _affine(e) -> bool:
    """Whether the interval of e is exact (an affine index: its bounds are reached at the box's corners)."""
    xs = sorted(e.free_symbols, key=str)
    return not xs or (e.is_polynomial(*xs) and sp.Poly(e, *xs).total_degree() <= 1)


def _exact_range(e, box, lo, hi, limit: int = 1 << 22) -> tuple:
    """The least and greatest value of index e over the box, evaluated at every point when there are at most
    `limit` of them (exact: True); else the interval bounds (lo, hi), which may not be reached (False)."""
    vs = sorted(e.free_symbols & set(box.ranges), key=str)
    sizes = [int(box.ranges[v][1]) - int(box.ranges[v][0]) + 1 for v in vs]
    if not vs or np.prod(sizes, dtype=np.float64) > limit:
        return lo, hi, False
    env = {v: np.arange(int(box.ranges[v][0]), int(box.ranges[v][1]) + 1).reshape(
        [-1 if a == k else 1 for a in range(len(vs))]) for k, v in enumerate(vs)}
    vals = np.broadcast_to(np_eval(e, env), sizes)
    return sp.Integer(int(vals.min())), sp.Integer(int(vals.max())), True


def _affine_rows(c, vs: list):
    """An affine condition over integer variables `vs` as rows (a, b) of a . x <= b; None when it is not one (or,
    !=, a non-affine side)."""
    if c is sp.true:
        return []
    if isinstance(c, sp.And):
        parts = [_affine_rows(x, vs) for x in c.args]
        return None if any(p is None for p in parts) else [r for p in parts for r in p]
    if not isinstance(c, sp.core.relational.Relational) or c.rel_op not in ("<", "<=", ">", ">=", "=="):
        return None
    d = sp.nsimplify(sp.expand(c.lhs - c.rhs), rational=True)
    if not _affine(d) or d.free_symbols - set(vs):
        return None
    d = sp.expand(d * sp.ilcm(*(sp.fraction(t)[1] for t in [*(d.coeff(v) for v in vs), d.subs({v: 0 for v in vs})])))
    a, b = tuple(int(d.coeff(v)) for v in vs), -int(d.subs({v: 0 for v in vs}))   # integer coefficients
    strict = 1 if c.rel_op in ("<", ">") else 0   # integer coefficients and points: d < 0 is d <= -1
    up, down = [(a, b - strict)], [(tuple(-x for x in a), -b - strict)]
    return up if c.rel_op in ("<", "<=") else down if c.rel_op in (">", ">=") else up + down


def _solve(rows) -> tuple | None:
    """The point where the k rows (a, b) of k variables hold with equality, in exact fractions; None if singular."""
    m = [[Fraction(x) for x in a] + [Fraction(b)] for a, b in rows]
    k = len(m)
    for col in range(k):
        piv = next((r for r in range(col, k) if m[r][col] != 0), None)
        if piv is None:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(k):
            if r != col and m[r][col] != 0:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return tuple(m[r][k] / m[r][r] for r in range(k))


def _piecewise_range(e, box, lo, hi) -> tuple:
    """Bounds of a where(c, a, b) index over the box, each branch over the part of the box where it is taken (its
    affine conditions, the earlier ones negated: a linear program solved exactly at the vertices); (lo, hi)
    unchanged where that does not apply. Conservative: real vertices may lie between the integer points."""
    vs = sorted(e.free_symbols & set(box.ranges), key=str)
    if not isinstance(e, sp.Piecewise) or not 0 < len(vs) <= 3:
        return lo, hi
    unit = [tuple(int(a == k) for a in range(len(vs))) for k in range(len(vs))]
    rows = [(unit[k], int(box.ranges[v][1])) for k, v in enumerate(vs)] + \
        [(tuple(-x for x in unit[k]), -int(box.ranges[v][0])) for k, v in enumerate(vs)]
    los, his = [], []
    for val, cond in e.args:
        own = _affine_rows(cond, vs)
        if own is None or not _affine(val) or val.free_symbols - set(vs):
            return lo, hi
        coef, const = [Fraction(int(val.coeff(v))) for v in vs], Fraction(int(val.subs({v: 0 for v in vs})))
        region = rows + own
        points = []
        for pick in itertools.combinations(region, len(vs)):
            x = _solve(pick)
            if x is not None and all(sum(p * q for p, q in zip(a, x)) <= b for a, b in region):
                points.append(sum(p * q for p, q in zip(coef, x)) + const)
        if points:   # an empty part: a branch never taken
            los.append(math.ceil(min(points)))
            his.append(math.floor(max(points)))
        neg = _affine_rows(sp.Not(cond), vs) if isinstance(cond, sp.core.relational.Relational) else None
        rows = rows + (neg or [])   # later branches: where this one is not taken (else over more: conservative)
    return (sp.Integer(min(los)), sp.Integer(max(his))) if los else (lo, hi)


def refuse_functorch(inputs: dict) -> None:
    """An UnsupportedError for tensors of a torch.func transform (vmap, grad, jvp), which the kernels cannot read
    (they failed inside the launch, or in torch's autograd.Function check)."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    for name, t in inputs.items():
        if check is not None and isinstance(t, torch.Tensor) and check(t):
            raise UnsupportedError(f"input {name} is a torch.func transform's tensor (vmap, grad, jvp): moa's "
                                   "kernels run on plain tensors; batch by leading axes (they broadcast) and "
                                   "differentiate with torch.autograd")
        if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:   # its tangent was lost
            raise UnsupportedError(f"input {name} carries a forward-mode tangent (torch.autograd.forward_ad): moa "
                                   "has no forward-mode derivatives; differentiate in reverse mode (.backward())")


def _dims_text(dims: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in dims.items())


def _dim_syms(program: Program, b: Binding):
    return [(d, b.dims[d.name]) for d in program.dims if d.name in b.dims]


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_names(program: Program, inputs: dict) -> None:
    """InputError naming the inputs missing from the call, or passed but not declared by the program."""
    decl = program.input_map
    missing = [n for n in decl if n not in inputs]
    if missing:
        raise InputError(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                         f"{program.name} takes {', '.join(decl)}")
    extra = [n for n in inputs if n not in decl]
    if extra:
        raise InputError(f"unknown input{'s' if len(extra) > 1 else ''} {', '.join(extra)}; "
                         f"{program.name} takes {', '.join(decl)}")


def check_dense(inputs: dict) -> None:
    """Every input a dense tensor (not sparse, jagged or nested: their sizes cannot be read as a call reads them)."""
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"input {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_nested:   # a strided nested tensor has no sizes
            raise InputError(f"input {name} must be a dense (strided) tensor, got " + (
                "a nested tensor; pad it with .to_padded_tensor(0.0), or pack its sequences for k.varlen"
                if t.is_nested else f"layout {t.layout}; convert it with .to_dense()"))


def compound_dims(program: Program, shapes: dict, values: dict, origin: dict | None = None) -> None:
    """Bind (into `values`) the dims that appear only in compound extents (2*n - 1, h*d), solving each extent with
    one unknown dim against the axis's size (shapes: input name -> its whole shape, batch axes first); an extent
    through floor or mod (e // 2) has many solutions and binds nothing."""
    for _ in range(2):   # a dim bound by one extent may leave one unknown in another
        for name, node in program.input_map.items():
            shape = shapes[name]
            for ax, ext in enumerate(node.shape):
                unknown = [s for s in ext.free_symbols if s.name not in values]
                if len(unknown) == 1 and not ext.has(sp.floor, sp.ceiling, sp.Mod) and len(shape) >= node.rank:
                    actual = int(shape[len(shape) - node.rank + ax])
                    sol = sp.solve(sp.Eq(ext.xreplace({s: values[s.name] for s in ext.free_symbols
                                                       if s.name in values}), actual), unknown[0])
                    if len(sol) == 1 and sol[0].is_Integer and sol[0] > 0:
                        values[unknown[0].name] = int(sol[0])
                        if origin is not None:
                            origin[unknown[0].name] = f"input {name} axis {ax}"


def bind(program: Program, inputs: dict, dims: dict | None = None) -> Binding:
    """Check the call's tensors against the program and bind every dim; InputError names what is wrong."""
    decl = program.input_map
    check_names(program, inputs)
    check_dense(inputs)
    refuse_functorch(inputs)
    devices = {t.device for t in inputs.values()}
    if len(devices) > 1:
        raise InputError("inputs are on different devices: " + ", ".join(f"{n} on {t.device}"
                                                                         for n, t in inputs.items()))
    device = devices.pop() if devices else torch.device("cpu")
    float_dtypes = {}
    for name, node in decl.items():
        t = inputs[name]
        if node.dtype == ir.FLOAT:
            if t.dtype not in FLOAT_DTYPES:
                raise InputError(f"input {name} must be a floating tensor (float64, float32, float16, bfloat16), "
                                 f"got {t.dtype}")
            float_dtypes[name] = t.dtype
        elif node.dtype == ir.INT and t.dtype not in INT_DTYPES:
            raise InputError(f"input {name} is declared int and must be an integer tensor, got {t.dtype}")
        elif node.dtype == ir.BOOL and t.dtype != torch.bool and t.dtype not in INT_DTYPES:
            raise InputError(f"input {name} is declared bool and must be a bool tensor, got {t.dtype}")
    if len(set(float_dtypes.values())) > 1:
        raise InputError("float inputs have different dtypes: " + ", ".join(f"{n} {d}" for n, d in
                                                                          float_dtypes.items()))
    dtype = next(iter(float_dtypes.values()), torch.float64)

    values = {k: int(v) for k, v in (dims or {}).items()}
    origin = {k: "given" for k in values}
    leads = {}
    for name, node in decl.items():
        t = inputs[name]
        r = node.rank
        if t.dim() < r:
            raise InputError(f"input {name} must have at least {r} axes {sy.show_shape(node.shape)}, got shape "
                             f"{_shape_text(t.shape)}")
        leads[name] = tuple(t.shape[:t.dim() - r])
        for ax, ext in enumerate(node.shape):
            actual = t.shape[t.dim() - r + ax]
            if ext.is_Symbol:
                if ext.name in values and values[ext.name] != actual:
                    raise InputError(f"dim {ext.name} is {values[ext.name]} from {origin[ext.name]} but "
                                     f"{actual} from input {name} (axis {ax} of {sy.show_shape(node.shape)})")
                values.setdefault(ext.name, actual)
                origin.setdefault(ext.name, f"input {name} axis {ax}")
    compound_dims(program, {name: tuple(inputs[name].shape) for name in decl}, values, origin)
    for d in program.dims:
        if d.name not in values:
            used = [n for n, node in decl.items() if any(d in sp.sympify(e).free_symbols for e in node.shape)]
            how = (f"it appears only in compound extents of {', '.join(used)} that the shapes do not determine"
                   if used else "no input's shape mentions it; declare an input with an axis of extent "
                   f"{d.name}")
            raise InputError(f"dim {d.name} cannot be bound from the inputs' shapes: {how}")
        if values[d.name] < 0:
            raise InputError(f"dim {d.name} must be non-negative, got {values[d.name]}")
    for name, node in decl.items():
        t = inputs[name]
        want = tuple(sy.evaluate(e, values) for e in node.shape)
        got = tuple(t.shape[t.dim() - node.rank:])
        if want != got:
            raise InputError(f"input {name} must have shape {sy.show_shape(node.shape)} = {_shape_text(want)} "
                             f"(with {', '.join(f'{k}={v}' for k, v in values.items())}), got {_shape_text(got)}")
    try:
        batch = tuple(torch.broadcast_shapes(*leads.values())) if leads else ()
    except RuntimeError:
        raise InputError("leading (batch) axes do not broadcast: " + ", ".join(
            f"{n} {_shape_text(s)}" for n, s in leads.items())) from None
    for g in program.guards():
        v = sy.evaluate(g.expr, values)
        if v != 0:
            raise InputError(g.message + f" (got {', '.join(f'{k}={x}' for k, x in values.items())})")
    tensors = {}
    for name, node in decl.items():
        t = inputs[name]
        if node.dtype == ir.BOOL and t.dtype != torch.bool:   # an integer tensor as flags: nonzero is true (the
            t = t != 0                                        # per-tile any / all summaries read 0 / 1)
        tensors[name] = t.expand(tuple(batch) + tuple(t.shape[t.dim() - node.rank:]))  # () for a scalar
    return Binding(values, batch, dtype, device, tensors)


def refuse_grad(inputs: dict, what: str = "decode, varlen and paged calls",
                how: str = "train with k(...) on the contiguous inputs") -> None:
    """Calls without a backward (decode, varlen, paged, ring): an UnsupportedError when autograd would need their
    graph (rather than outputs that silently carry no gradient)."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs.values()):
        names = ", ".join(n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad)
        raise UnsupportedError(f"{what} compute no gradients, and {names} require grad: {how}, or run this call "
                               "under torch.no_grad()")
