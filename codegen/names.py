"""Identifiers of generated code: user names stay readable unless two of their renamed forms could collide.

The readable scheme puts affixes on user names: input/output X -> X_ptr, off_X, stride_X_<k>, stride_X_z<b>;
dim n -> dim_n; leading index a -> idx_a. Distinct user names can still meet (an input `off_Q` has the
pointer `off_Q_ptr`, which is also the offset of an input `Q_ptr`), and `off_X` can meet the kernel's own
`off_z<b>` / `off_lse`, and an input can be named like a buffer of the backward kernels (`dO`, `lse`, `S`, ...).
When any collision is possible, every user name is replaced by an opaque `u<k>` for
code generation (the kernel's own names never look like that), so renaming stays injective. The runtime
translates the call's tensors and dims to these names (`codegen_binding`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import sympy as sp

from moa import dnf as D
from moa import ir
from moa.program import Program

_INTERNAL = re.compile(r"^(off_z\d+|off_lse)$")
# the buffers the backward kernels pass besides the inputs (codegen/backward_shape.py, chunked_backward.py,
# window_backward.py BUFFERS; a test keeps this their union): an input named like one is renamed, as are `grad_*`
KERNEL_BUFFERS = frozenset({"dO", "lse", "delta", "dQ", "dK", "dV", "dH", "P2", "dn", "dz", "U", "uz", "zrow", "S",
                            "zs", "fidx", "fw", "S0", "z0", "g0", "out"})


@dataclass(frozen=True)
class CodegenView:
    """The program and DNF that code generation sees, and the maps back to the user's names."""
    program: Program
    dnf: tuple
    inputs: dict     # codegen name -> user name
    dims: dict       # codegen dim name -> user dim name
    outputs: dict    # codegen output name -> user output name
    words: dict = field(default_factory=dict)   # every renamed name (inputs, dims, outputs, index variables) -> user's

    def user_text(self, text: str) -> str:
        """A message about the code-generation program in the user's names (u5 -> O)."""
        if not self.words:
            return text
        pat = re.compile(r"\b(" + "|".join(sorted(map(re.escape, self.words), key=len, reverse=True)) + r")\b")
        return pat.sub(lambda m: self.words[m.group(1)], text)


def _derived(program: Program, dnf_outputs) -> list:
    out = []
    for name in [n.attrs[0] for n in program.inputs] + [o.name for o in dnf_outputs]:
        out += [f"{name}_ptr", f"off_{name}"] + [f"stride_{name}_{k}" for k in range(8)] + \
            [f"stride_{name}_z{k}" for k in range(8)]
    out += [f"dim_{d.name}" for d in program.dims]
    # a leading index shared by several outputs (the branches of one output) is one name, not a collision
    out += sorted({f"idx_{v.name}" for o in dnf_outputs for v in o.vars[:-2]})
    return out


def needs_renaming(program: Program, dnf_outputs) -> bool:
    names = _derived(program, dnf_outputs)
    ins = {n.attrs[0] for n in program.inputs}
    return len(names) != len(set(names)) or any(_INTERNAL.match(n) for n in names) or \
        bool(ins & KERNEL_BUFFERS) or any(n.startswith("grad_") for n in ins)


def codegen_view(program: Program, dnf_outputs) -> CodegenView:
    """The identity view, or one with every user name replaced by u<k> when renamed forms could collide."""
    if not needs_renaming(program, dnf_outputs):
        ins = {n.attrs[0]: n.attrs[0] for n in program.inputs}
        return CodegenView(program, tuple(dnf_outputs), ins, {d.name: d.name for d in program.dims},
                           {o.name: o.name for o in dnf_outputs})
    counter = iter(range(1 << 30))
    fresh = {}

    def new(user):
        if user not in fresh:
            fresh[user] = f"u{next(counter)}"
        return fresh[user]

    dim_map = {d: sp.Symbol(new(("dim", d.name)), integer=True, positive=True) for d in program.dims}
    in_names = {n.attrs[0]: new(("in", n.attrs[0])) for n in program.inputs}
    inputs = tuple(ir.input_(in_names[n.attrs[0]], tuple(sp.sympify(s).xreplace(dim_map) for s in n.shape), n.dtype)
                   for n in program.inputs)
    outs = []
    out_map = {}
    for o in dnf_outputs:
        var_map = {v: sp.Symbol(new(("var", o.name, v.name)), integer=True, nonnegative=True) for v in o.vars}
        sym_map = {**dim_map, **var_map}
        expr = _rename(D.subs(o.expr, sym_map), in_names, dim_map)
        oname = new(("out", o.name))
        out_map[oname] = o.name
        outs.append(D.DnfOutput(oname, tuple(var_map[v] for v in o.vars),
                                tuple(sp.sympify(x).xreplace(dim_map) for x in o.extents), expr, o.dtype))
    prog = replace(program, dims=tuple(dim_map[d] for d in program.dims), inputs=inputs,
                   bindings=(), outputs=tuple((o.name, None) for o in outs))
    return CodegenView(prog, tuple(outs), {v: k for k, v in in_names.items()},
                       {dim_map[d].name: d.name for d in program.dims}, out_map,
                       {cg: key[-1] for key, cg in fresh.items()})


def _rename(e, names, dim_map):
    """Input names in reads, dims in the extents of reductions (subs already did indices and expressions)."""
    if isinstance(e, D.Read):
        return replace(e, name=names[e.name])
    if isinstance(e, D.BINDERS):
        e = replace(e, extent=sp.sympify(e.extent).xreplace(dim_map))
    kids = D.children(e)
    return D.with_children(e, [_rename(k, names, dim_map) for k in kids]) if kids else e


def codegen_binding(view: CodegenView, b):
    """The call's binding under the codegen names."""
    if all(k == v for k, v in view.inputs.items()) and all(k == v for k, v in view.dims.items()):
        return b
    return replace(b, dims={cg: b.dims[user] for cg, user in view.dims.items()},
                   tensors={cg: b.tensors[user] for cg, user in view.inputs.items()})


def fresh_names(program: Program, dnf_outputs, bases) -> tuple:
    """Names for arrays added as inputs of code generation (a split schedule's stored branch values): each base,
    or base_<k>, the first that is no input's or output's name and keeps every renamed form distinct (the
    readable scheme above, `needs_renaming` false for the program with them added)."""
    taken = {n.attrs[0] for n in program.inputs} | {o.name for o in dnf_outputs}
    out = []
    for base in bases:
        for k in range(1 << 16):
            name = base if k == 0 else f"{base}_{k}"
            if name in taken:
                continue
            trial = replace(program, inputs=program.inputs + tuple(ir.input_(x, ()) for x in out + [name]))
            if not needs_renaming(trial, dnf_outputs):
                break
        out.append(name)
        taken.add(name)
    return tuple(out)
