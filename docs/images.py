"""Draw the pictures of the documentation with moa itself: `make docs-images` (or `python docs/images.py`).

docs/images/tiles/<example>.png: the (query tile, key tile) map of every program in examples/ (`moa explain
--tiles`), at n = m = 1024, d = e = 64, h = 4 heads over g = 2 kv heads, bf16 tiles of the GPU runtime;
docs/images/tutorial_*.png: the tile maps and the cost plot of the tutorial's programs (docs/tutorial/*.moa).
The PNGs are committed; rerun this after changing the compiler or the plots. Needs the `plot` extra.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"n": 1024, "m": 1024, "d": 64, "e": 64, "h": 4, "g": 2}


def draw(only=()) -> list[Path]:
    import moa
    from moa.cli.plots import cost_plot, tiles_plot

    out = ROOT / "docs" / "images"
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    jobs = [(p, out / "tiles" / f"{p.stem}.png") for p in sorted((ROOT / "examples").glob("*.moa"))]
    jobs += [(p, out / f"tutorial_{p.stem}.png") for p in sorted((ROOT / "docs" / "tutorial").glob("*.moa"))]
    written = []
    for src, png in jobs:
        if only and src.stem not in only:
            continue
        k = moa.compile(src)
        dims = {d.name: DIMS[d.name] for d in k.program.dims}
        with contextlib.redirect_stdout(io.StringIO()):
            tiles_plot(k, str(png), dims)
        written.append(png)
        print(f"wrote {png.relative_to(ROOT)}")
    k = moa.compile(ROOT / "docs" / "tutorial" / "gated.moa")
    if not only or "cost" in only:
        png = out / "tutorial_cost.png"
        cost_plot(k, str(png), {"n": 8192, "d": 128, "e": 128}, "bf16", "h100", fit=False)
        written.append(png)
        print(f"wrote {png.relative_to(ROOT)}")
    return written


if __name__ == "__main__":
    draw(tuple(sys.argv[1:]))
