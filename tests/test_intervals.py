"""The tile classification of moa/intervals.py against brute force: for masks that constrain one index
expression (i - j) by inequalities and a modulus, the skip formula holds exactly on the tiles without an
admissible pair: never a tile with one (that would be wrong), and no wasted tile (the analysis is tight)."""
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import moa
from moa import intervals as iv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CASES = [  # (example, params, branch, the branch's mask in numpy)
    ("pi_attention", {"k": 64, "s": 64, "T": 8}, 0, lambda i, j: (j <= i) & (i - j < 64)),
    ("pi_attention", {"k": 64, "s": 64, "T": 8}, 1,
     lambda i, j: (j < i) & ((i - j) % 64 == 0) & ((i - j) // 64 <= 8)),
    ("pi_attention", {"k": 20, "s": 7, "T": 3}, 1, lambda i, j: (j < i) & ((i - j) % 7 == 0) & ((i - j) // 7 <= 3)),
    ("dilated_window", {"w": 40, "r": 3}, 0, lambda i, j: (j <= i) & (i - j <= 40) & ((i - j) % 3 == 0)),
]


@pytest.mark.parametrize("name, params, branch, mask", CASES, ids=[f"{c[0]}-{c[2]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("bm, bn", [(16, 16), (64, 64), (32, 16), (16, 64)])
def test_skip_formula_is_exact_on_every_tile(name, params, branch, mask, bm, bn):
    k = moa.compile(EXAMPLES / f"{name}.moa", schedule="tiled", **params)
    skip = sp.lambdify((iv.I_LO, iv.I_HI, iv.J_LO, iv.J_HI), k.schedules["O"].branches[branch].skip, "math")
    n = 300
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    admissible = mask(i, j)
    for r0 in range(0, n, bm):
        for t0 in range(0, n, bn):
            has_pair = bool(admissible[r0:r0 + bm, t0:t0 + bn].any())
            skipped = bool(skip(r0, min(r0 + bm, n) - 1, t0, min(t0 + bn, n) - 1))
            assert skipped == (not has_pair), (r0, t0)


def test_a_modular_atom_alone_keeps_the_diagonal_tile():
    """j < i alone and (i - j) mod 8 == 0 alone are each satisfiable on a diagonal tile; together they are not."""
    i, j = sp.symbols("i j", integer=True)
    box = iv.Box({i: (iv.I_LO, iv.I_HI), j: (iv.J_LO, iv.J_HI)})
    from moa import dnf as D
    from moa import ir

    lt = D.Op("lt", (D.Index(j), D.Index(i)), ir.BOOL)
    mod = D.Op("eq", (D.Index(sp.Mod(i - j, 8)), D.Const(0, ir.INT)), ir.BOOL)
    corners = {iv.I_LO: 0, iv.I_HI: 7, iv.J_LO: 0, iv.J_HI: 7}
    assert not iv.classify(lt, box)[0].subs(corners)
    assert not iv.classify(mod, box)[0].subs(corners)
    assert iv.classify(D.Op("and", (lt, mod), ir.BOOL), box)[0].subs(corners)


@pytest.mark.parametrize("e,lo", [("i - Min(i, j)", 0), ("Max(i, j) - j", 0), ("Max(j - i, i - j)", 0),
                                  ("-Max(i - j, j - i) + 5", -4), ("2 * Max(i, j) - 2 * j", 0),
                                  ("Min(i - j, j - i)", -9)])
def test_spread_minmax_bounds_the_terms_together(e, lo):
    """i - Min(i, j) = Max(0, i - j) (sums and constant factors pushed into Min / Max, Max(x, -x) = Abs(x)): the
    same values everywhere, and the interval's lower bound is reached."""
    i, j = sp.symbols("i j", integer=True)
    ex = sp.sympify(e, locals={"i": i, "j": j})
    sp_ex = iv.spread_minmax(ex)
    box = iv.Box({i: (sp.Integer(0), sp.Integer(9)), j: (sp.Integer(0), sp.Integer(9))})
    assert iv.interval(sp_ex, box)[0] == lo
    for a in range(10):
        for b in range(10):
            assert ex.subs({i: a, j: b}) == sp_ex.subs({i: a, j: b})


def test_a_boolean_where_is_decided_soundly_and_tightly_by_its_parts():
    """where(c, a, b) = (c and a) or (not c and b): on every tile of a grid, the skip test never holds where the
    predicate holds somewhere, the full test never where it fails somewhere; and where c is constant on the tile
    and decides the branch taken, the test is as tight as that branch's own."""
    import itertools

    from moa import dnf as D
    from moa import ir

    i, j = sp.symbols("i j", integer=True)
    box = iv.Box({i: (iv.I_LO, iv.I_HI), j: (iv.J_LO, iv.J_HI)})
    atoms = {"j <= i": (D.Op("le", (D.Index(j), D.Index(i)), ir.BOOL), lambda a, b: b <= a),
             "j < 12": (D.Op("lt", (D.Index(j), D.Const(12, ir.INT)), ir.BOOL), lambda a, b: b < 12),
             "i - j < 5": (D.Op("lt", (D.Index(i - j), D.Const(5, ir.INT)), ir.BOOL), lambda a, b: a - b < 5),
             "i >= 20": (D.Op("ge", (D.Index(i), D.Const(20, ir.INT)), ir.BOOL), lambda a, b: a >= 20)}
    n = 40
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")

    def tests(pred):
        return [sp.lambdify((iv.I_LO, iv.I_HI, iv.J_LO, iv.J_HI), f, "math") for f in iv.classify(pred, box)]

    own = {name: tests(atom) for name, (atom, _) in atoms.items()}
    uniform = decided = 0
    for c, a, b in itertools.product(atoms, repeat=3):
        pred = D.Op("where", (atoms[c][0], atoms[a][0], atoms[b][0]), ir.BOOL)
        truth = np.where(atoms[c][1](ii, jj), atoms[a][1](ii, jj), atoms[b][1](ii, jj))
        skip, full = tests(pred)
        for r0, t0 in itertools.product(range(0, n, 8), repeat=2):
            at = (r0, r0 + 7, t0, t0 + 7)
            tile = truth[r0:r0 + 8, t0:t0 + 8]
            s, f = bool(skip(*at)), bool(full(*at))
            assert not (s and tile.any()) and not (f and not tile.all()), (c, a, b, r0, t0)
            for branch, taken in ((a, bool(own[c][1](*at))), (b, bool(own[c][0](*at)))):
                if taken:   # c decided on the tile: the branch's own tests
                    assert (s, f) == tuple(bool(t(*at)) for t in own[branch]), (c, a, b, r0, t0)
            uniform += bool(tile.all() or not tile.any())
            decided += s or f
    assert decided > 0.9 * uniform, (decided, uniform)
