"""`moa check`: random float64 inputs, IR reference vs DNF evaluation vs the kernel, and PyTorch where the program's
algebra is SDPA's (the DNF's score and mask compared with F.scaled_dot_product_attention's)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import sympy as sp
import torch
from torch.nn.attention.bias import causal_lower_right

from moa import dnf as D
from moa import ir
from moa import symbolic as sy
from moa.errors import InputError, UnsupportedError

# the largest dim a call may give: the kernels index rows and keys in 32-bit integers (tl.program_id(0) * BLOCK_M
# + tl.arange), and CUDA grids hold at most 2^31 - 1 programs along their first axis
MAX_DIM = 2 ** 31 - 1


def check_dims(program, dims: dict, what: str = "dims", complete: bool = True) -> dict:
    """The dims of a call of `program` as given by a user: each a dim of the program (every one if `complete`), a
    non-negative integer. Raises InputError naming the dim and the program's dims."""
    names = [d.name for d in program.dims]
    declared = f"{program.name} declares dims {', '.join(names)}"
    params = {p for p, _ in program.params}
    for k, v in dims.items():
        if k not in names:
            hint = f" ({k} is a param: set it with --param {k}=...)" if k in params else ""
            raise InputError(f"{what}: unknown dim {k!r}{hint}; {declared}")
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(f"{what}: dim {k} must be a non-negative integer, got {v!r}; {declared}")
        if v < 0:
            raise InputError(f"{what}: dim {k} must be a non-negative integer, got {v}; {declared}")
        if v > MAX_DIM:
            raise InputError(f"{what}: dim {k}={v} is too large: dims are at most 2^31 - 1 = {MAX_DIM} (the kernels "
                             f"index rows and keys in 32-bit integers); {declared}")
    missing = [x for x in names if x not in dims]
    if missing and complete:
        raise InputError(f"{what}: missing dim{'s' if len(missing) > 1 else ''} {', '.join(missing)}; {declared}, "
                         f"e.g. {','.join(f'{x}={dims.get(x, 16)}' for x in names)}")
    return dict(dims)


def random_inputs(program, dims: dict, seed: int = 0, batch: int = 0, dtype=torch.float64) -> dict:
    """Inputs for a program: normal floats, sorted small ints (document ids), sparse booleans (flags)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    lead = (batch,) if batch else ()
    for node in program.inputs:
        try:
            shape = tuple(int(sy.evaluate(s, dims)) for s in node.shape)
        except KeyError:
            raise InputError(f"--dims must give every dim used by input {node.attrs[0]} "
                             f"{sy.show_shape(node.shape)}") from None
        name = node.attrs[0]
        if any(x < 0 for x in shape):
            raise InputError(f"input {name} {sy.show_shape(node.shape)} has a negative extent at "
                             f"{', '.join(f'{k}={v}' for k, v in dims.items())}: {shape}")
        if node.dtype == ir.FLOAT:
            out[name] = torch.randn((*lead, *shape), generator=g, dtype=torch.float64).to(dtype)
        elif node.dtype == ir.INT:
            hi = max(2, (shape[-1] if shape else 4) // 8)
            ids = torch.randint(0, hi, (*lead, *shape), generator=g)
            out[name] = torch.sort(ids, dim=-1)[0] if ids.dim() else ids
        else:
            out[name] = torch.rand((*lead, *shape), generator=g) < 0.1
    return out


@dataclass
class CheckReport:
    rows: list = field(default_factory=list)   # (what, output, max abs err, max rel err)
    notes: list = field(default_factory=list)
    tol: float = 1e-12
    no_kernel: str | None = None   # why the fused kernel was not compiled (a check that ran it fails then)

    @property
    def ok(self) -> bool:
        return self.no_kernel is None and all(rel <= self.tol for _, _, _, rel in self.rows)

    def text(self) -> str:
        lines = [f"{'comparison':34s} {'output':8s} {'max abs err':>12s} {'max rel err':>12s}"]
        for what, name, a, r in self.rows:
            lines.append(f"{what:34s} {name:8s} {a:12.3e} {r:12.3e}")
        lines += self.notes
        if self.no_kernel is not None:
            lines.append("NO KERNEL: moa compiles no fused kernel for this program (the rows above compare the "
                         "reference evaluations only)")
        elif not self.ok:
            lines.append(f"FAILED (tolerance {self.tol:g} relative)")
        else:
            lines.append("OK")
        return "\n".join(lines)


def _err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs, max rel) difference; NaN in the same places on both sides agree, NaN on one side only is inf."""
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0, 0.0
    na, nb = a.isnan(), b.isnan()
    if not torch.equal(na, nb):
        return float("inf"), float("inf")
    a, b = a[~na], b[~nb]
    if a.numel() == 0:
        return 0.0, 0.0
    same = a == b   # equal infinities agree
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs()).max().item()
    scale = b[b.isfinite()].abs().max().item() if b.isfinite().any() else 0.0
    return diff, diff / max(scale, 1e-300)


def check(kernel, dims: dict, seed: int = 0, batch: int = 2, run_kernel: bool = True) -> CheckReport:
    """Compare the unfused IR reference with the DNF evaluation, the fused kernel (if it compiles) and PyTorch's
    F.scaled_dot_product_attention for every output whose DNF is SDPA's (plain, causal, scaled, grouped heads)."""
    rep = CheckReport()
    dims = check_dims(kernel.program, dims)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise InputError(f"batch must be a non-negative integer (0: no batch axis), got {batch!r}")
    inputs = random_inputs(kernel.program, dims, seed, batch)
    ref = kernel.reference(**inputs)
    dnf = kernel.dnf_reference(**inputs)
    if not isinstance(ref, dict):
        ref, dnf = {kernel.output_names[0]: ref}, {kernel.output_names[0]: dnf}
    for name in ref:
        rep.rows.append(("DNF vs IR reference (float64)", name, *_err(dnf[name], ref[name])))
    if run_kernel:
        try:
            out = kernel(**inputs)
        except UnsupportedError as e:
            rep.notes.append(f"kernel: not compiled ({e.message})")
            rep.no_kernel = e.message
        else:
            if not isinstance(out, dict):
                out = {kernel.output_names[0]: out}
            for name in ref:
                rep.rows.append(("Triton kernel vs IR reference", name, *_err(out[name], ref[name])))
    for o in kernel.dnf:
        form = sdpa_form(kernel.program, o)
        if isinstance(form, str):
            rep.notes.append(f"no PyTorch equivalent for {o.name}: {form}")
            continue
        why = form.unsupported_at(dims)
        if why:
            rep.notes.append(f"PyTorch: {form.call()} is {o.name}'s equivalent, not compared at these dims ({why})")
            continue
        rep.rows.append(("IR reference vs PyTorch SDPA", o.name, *_err(ref[o.name], form.run(inputs, dims))))
        rep.notes.append(f"PyTorch oracle for {o.name}: {form.call()}")
    nans = [name for name, t in ref.items() if t.isnan().any()]
    if nans:
        rep.notes.append(f"note: the reference holds NaN in {', '.join(nans)} (e.g. 0/0 at a zero dim); compared "
                         "as equal where both sides have NaN")
    return rep


# ---- the PyTorch oracle: is an output's DNF SDPA's? --------------------------------------------------------------

@dataclass(frozen=True)
class SdpaForm:
    """How an output equals F.scaled_dot_product_attention: which inputs are q, k, v, the causal alignment, the
    scale and how key/value heads map to query heads."""
    q: str
    k: str
    v: str
    rows: sp.Expr             # query rows n
    keys: sp.Expr             # key rows m
    causal: str | None        # None, "top-left" (j <= i) or "bottom-right" (j <= i + m - n)
    scale: sp.Expr | None     # None: SDPA's default 1/sqrt(d)
    kv_heads: str             # "same", "shared" (K, V without the head axis), "grouped" (head a uses a // (h // g))
    heads: tuple = ()         # (query heads, kv heads) for "grouped"

    def call(self) -> str:
        """The PyTorch call, as text."""
        k, v = self.k, self.v
        if self.kv_heads == "shared":
            k, v = f"{k}.unsqueeze(-3)", f"{v}.unsqueeze(-3)"
        args = [self.q, k, v]
        if self.causal == "top-left":
            args.append("is_causal=True")
        elif self.causal == "bottom-right":
            args.append(f"attn_mask=causal_lower_right({sy.show(self.rows)}, {sy.show(self.keys)})")
        if self.scale is not None:
            args.append(f"scale={sy.show(self.scale)}")
        if self.kv_heads == "grouped":
            args.append("enable_gqa=True")
        return f"F.scaled_dot_product_attention({', '.join(args)})"

    def unsupported_at(self, dims: dict) -> str | None:
        """Why SDPA cannot be compared at these dims (rows without keys, heads that do not group), or None."""
        n, m = sy.evaluate(self.rows, dims), sy.evaluate(self.keys, dims)
        if m == 0:
            return "no keys: SDPA's softmax over an empty row is undefined, moa gives 0"
        if self.causal == "bottom-right" and n > m:
            return f"{n - m} rows without keys: SDPA's lower-right bias gives NaN there, moa 0"
        if self.kv_heads == "grouped":
            h, g = (sy.evaluate(x, dims) for x in self.heads)
            if g == 0 or h % g:
                return f"{h} query heads are not a multiple of {g} key/value heads"
        return None

    def run(self, inputs: dict, dims: dict) -> torch.Tensor:
        """F.scaled_dot_product_attention on the call's tensors, in float64."""
        q, k, v = (inputs[x].double() for x in (self.q, self.k, self.v))
        if self.kv_heads == "shared":
            k = k.unsqueeze(-3).expand(*q.shape[:-2], *k.shape[-2:])
            v = v.unsqueeze(-3).expand(*q.shape[:-2], *v.shape[-2:])
        kw: dict = {}
        if self.causal == "top-left":
            kw["is_causal"] = True
        elif self.causal == "bottom-right":
            with warnings.catch_warnings():   # its warning is about n > m, which unsupported_at excludes
                warnings.simplefilter("ignore")
                kw["attn_mask"] = causal_lower_right(q.shape[-2], k.shape[-2])
        if self.scale is not None:
            kw["scale"] = float(sy.evaluate(self.scale, dims))
        if self.kv_heads == "grouped":
            kw["enable_gqa"] = True
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


def _short(e, limit: int = 70) -> str:
    s = D.show(e)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _same(a, b) -> bool:
    return sp.expand(sp.sympify(a) - sp.sympify(b)) == 0


def _number(e):
    """A scalar DNF expression over constants and dims (no index variable) as a sympy expression, else None."""
    if isinstance(e, D.Const) and isinstance(e.value, (int, float)) and not isinstance(e.value, bool):
        return sp.nsimplify(e.value) if isinstance(e.value, float) else sp.Integer(e.value)
    if isinstance(e, D.Index):
        return e.expr if all(s.is_positive for s in e.expr.free_symbols) else None
    if isinstance(e, D.Op):
        args = [_number(a) for a in e.args]
        if any(a is None for a in args):
            return None
        ops = {"sqrt": lambda x: sp.sqrt(x), "mul": lambda x, y: x * y, "div": lambda x, y: x / y,
               "rsqrt": lambda x: 1 / sp.sqrt(x)}
        if e.fn in ops and len(args) == (1 if e.fn in ("sqrt", "rsqrt") else 2):
            return ops[e.fn](*args)
    return None


def _scaled_dot(s):
    """(Reduce of q . k, scale or None for 1/sqrt(extent)) when s is q . k times a constant, else None."""
    if isinstance(s, D.Reduce):
        return s, sp.Integer(1)
    if not (isinstance(s, D.Op) and s.fn in ("mul", "div") and len(s.args) == 2):
        return None
    a, b = s.args
    if s.fn == "mul" and isinstance(b, D.Reduce):
        a, b = b, a
    if not isinstance(a, D.Reduce):
        return None
    c = _number(b)
    if c is None:
        return None
    if s.fn == "mul":
        return a, c
    if _same(c, sp.sqrt(a.extent)):
        return a, None
    return a, 1 / c


def _mask_offset(mask, i, j):
    """E - (j - i) for a mask that reads `E <= 0` (a single integer comparison), else None."""
    if not (isinstance(mask, D.Op) and mask.fn in ("le", "lt", "ge", "gt")):
        return None
    sides = []
    for x in mask.args:
        if isinstance(x, D.Index):
            sides.append(x.expr)
        elif isinstance(x, D.Const) and isinstance(x.value, int):
            sides.append(sp.Integer(x.value))
        else:
            return None
    a, b = sides
    e = {"le": a - b, "lt": a - b + 1, "ge": b - a, "gt": b - a + 1}[mask.fn]
    return sp.expand(e - (j - i))


def sdpa_form(program, out) -> SdpaForm | str:
    """The SdpaForm of one DNF output, or why it is not SDPA: the output must be fin((+)_j (s, 1, V[.., j, c]))
    with s = q . k times a constant, under no mask, j <= i or j <= i + m - n."""
    e = out.expr
    if not isinstance(e, D.SoftmaxSum):
        return "the output is not softmax(S) @ V"
    if len(out.vars) < 2:
        return "the output has no query and value axes"
    *lead, i, c = out.vars
    j, lead = e.var, tuple(lead)
    score, mask = e.score, None
    if isinstance(score, D.Op) and score.fn == "where" and score.args[2] == D.Const(float("-inf")):
        mask, score = score.args[0], score.args[1]
    found = _scaled_dot(score)
    dot = found[0] if found else None
    if dot is None or dot.op != "sum" or not (isinstance(dot.body, D.Op) and dot.body.fn == "mul"):
        return f"the score {_short(score)} is not SDPA's q . k times a constant"
    kv = dot.var
    reads = dot.body.args
    if not all(isinstance(r, D.Read) and r.dtype == ir.FLOAT for r in reads):
        return f"the score {_short(score)} is not SDPA's q . k times a constant"
    qr = [r for r in reads if tuple(r.index) == (*lead, i, kv)]
    kr = [r for r in reads if len(r.index) >= 2 and tuple(r.index[-2:]) == (j, kv)]
    if len(qr) != 1 or len(kr) != 1 or qr[0] is kr[0]:
        return f"the score {_short(score)} is not q[..., i, :] . k[..., j, :]"
    qr, kr = qr[0], kr[0]
    v = e.value
    if not (isinstance(v, D.Read) and v.dtype == ir.FLOAT and len(v.index) >= 2 and tuple(v.index[-2:]) == (j, c)
            and tuple(v.index[:-2]) == tuple(kr.index[:-2])):
        return f"the value {_short(v)} is not v[..., j, c] with k's leading indices"
    inputs = program.input_map
    qs, ks, vs = (inputs[r.name].shape for r in (qr, kr, v))
    lead_ext = tuple(out.extents[:-2])
    n, m, dd, ee = out.extents[-2], e.extent, dot.extent, out.extents[-1]
    klead = tuple(kr.index[:-2])
    heads: tuple = ()
    if klead == lead:
        kv_heads, kv_ext = "same", lead_ext
    elif lead and klead == lead[:-1]:
        kv_heads, kv_ext = "shared", lead_ext[:-1]
    elif lead and len(klead) == len(lead) and klead[:-1] == lead[:-1] and \
            _same(klead[-1], sp.floor(lead[-1] / sp.floor(lead_ext[-1] / ks[len(lead) - 1]))):
        kv_heads, kv_ext = "grouped", (*lead_ext[:-1], ks[len(lead) - 1])
        heads = (lead_ext[-1], ks[len(lead) - 1])
    else:
        return f"key/value heads {', '.join(sy.show(x) for x in klead) or '(none)'} are not the query's heads"
    want = {qr.name: (*lead_ext, n, dd), kr.name: (*kv_ext, m, dd), v.name: (*kv_ext, m, ee)}
    for name, shape in ((qr.name, qs), (kr.name, ks), (v.name, vs)):
        if len(shape) != len(want[name]) or not all(_same(a, b) for a, b in zip(shape, want[name])):
            return f"input {name} {sy.show_shape(shape)} is not read whole (SDPA takes whole q, k, v)"
    causal = None
    if mask is not None:
        off = _mask_offset(mask, i, j)
        if off is not None and off == 0:
            causal = "top-left"
        elif off is not None and _same(off, n - m):
            causal = "bottom-right"
        else:
            return f"the mask {_short(mask)} is not SDPA's (none, j <= i, or j <= i + m - n)"
    return SdpaForm(qr.name, kr.name, v.name, n, m, causal, found[1], kv_heads, heads)
