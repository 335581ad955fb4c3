"""The plots of the command line: predicted cost against n (`moa cost --plot`) and the (query tile, key tile) map
(`moa explain --tiles`). matplotlib is optional (the `plot` extra): imported when a plot is drawn."""
from __future__ import annotations

import math
import os

import numpy as np
import sympy as sp
import torch

from moa import onf
from moa import symbolic as sy
from moa.devices import canonical_dtype
from moa.errors import InputError, MoaError
from moa.runtime.costing import cost_breakdown
from moa.runtime.explain import tile_map


def pyplot(path: str, flag: str):
    """matplotlib's pyplot on the Agg backend, after checking that `path` can be written as an image: a missing
    matplotlib, a missing directory or a format matplotlib cannot write is an InputError (no traceback)."""
    try:
        import matplotlib   # optional dependency: only for plots
    except ImportError:
        raise InputError(f"{flag} needs matplotlib (the plot extra: pip install -e '.[plot]', or make setup)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # optional dependency: only for plots
    from matplotlib.backend_bases import FigureCanvasBase   # optional dependency: only for plots

    ext = os.path.splitext(path)[1][1:].lower()
    kinds = FigureCanvasBase.get_supported_filetypes()
    if ext not in kinds:
        raise InputError(f"{flag} {path}: cannot write {'.' + ext if ext else 'a file without an extension'}; "
                         f"name a .png, .svg or .pdf file (or any of {', '.join(sorted(kinds))})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path}: the directory {folder} does not exist")
    return plt


def save(fig, plt, path: str, flag: str) -> None:
    try:
        fig.savefig(path, dpi=110)
    except OSError as ex:
        raise InputError(f"{flag} {path}: cannot write it ({ex.strerror or ex})") from None
    finally:
        plt.close(fig)


def sweep_dims(k) -> set:
    """The sequence dims (row and key extents), swept together by the plot."""
    out = set()
    for s in k.schedules.values():
        for x in [s.row[1]] + [b.extent for b in s.branches]:
            out |= {v.name for v in sp.sympify(x).free_symbols}
    return out


def n_ticks(ax, ns) -> None:
    """The x axis of a sweep over n = 2^p: one tick per point, written 256, 1K, 2K ... (no 3x10^2 minor labels)."""
    from matplotlib.ticker import FixedLocator, NullLocator   # optional dependency: only for plots

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ns))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ns, [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in ns])


def cost_plot(k, path, dims: dict, dtype, device, batch=(), fit=False) -> str:
    """Predicted DRAM bytes and time against n, fused vs unfused, log-log (n = the sequence dims, swept
    together; the others fixed)."""
    plt = pyplot(path, "--plot")
    seq = sweep_dims(k)
    top = max(max(dims[s] for s in seq), 4096)
    ns = [2 ** p for p in range(8, int(math.log2(top)) + 1)]
    rows = []
    for n in ns:
        d = {**dims, **{s: n for s in seq}}
        rep, bd = cost_breakdown(k, dtype, device, batch=batch, needed=False, fit=fit, **d)
        rows.append((n, rep.dram_bytes, rep.unfused_dram_bytes, rep.predicted_seconds, bd.unfused_seconds,
                     rep.unfused_intermediate_bytes))
    a = np.array(rows, dtype=float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.loglog(a[:, 0], a[:, 1], "o-", color="tab:blue", label="fused (moa): DRAM bytes")
    ax1.loglog(a[:, 0], a[:, 2], "s--", color="tab:red", label="unfused (eager): DRAM bytes")
    ax1.loglog(a[:, 0], a[:, 5], ":", color="tab:red", alpha=0.7, label="unfused: intermediates")
    ax1.set_ylabel("DRAM traffic (bytes, log scale)")
    ax1.set_title("DRAM traffic")
    ax1.legend(fontsize=8)
    timed = a[:, 3].any() and not np.isnan(a[:, 3]).all()
    if timed:
        ax2.loglog(a[:, 0], a[:, 3] * 1e6, "o-", color="tab:blue", label="fused (moa)")
        ax2.loglog(a[:, 0], a[:, 4] * 1e6, "s--", color="tab:red", label="unfused (eager)")
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no time model for device 'cpu'", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("predicted time (µs, log scale)")
    ax2.set_title("predicted time (roofline + launch)")
    for ax in (ax1, ax2):
        n_ticks(ax, ns)
        swept = "" if seq == {"n"} else f"{', '.join(sorted(seq))} = "
        ax.set_xlabel(swept + "n (sequence length, tokens; log scale)")
        ax.grid(True, which="major", alpha=0.3)
    fixed = ", ".join(f"{x}={v}" for x, v in dims.items() if x not in seq)
    fig.suptitle(f"{k.program.name}: predicted cost, {bd.dtype} on {bd.device.name if bd.device else 'cpu'}"
                 + (f" ({fixed})" if fixed else ""))
    fig.tight_layout()
    save(fig, plt, path, "--plot")
    return path


def tiles_dims(k, dims: dict) -> dict:
    """The dims of `moa explain --tiles`: the sequence dims must be given, other dims default to 64."""
    missing = [d.name for d in k.program.dims if d.name not in dims]
    seq = sweep_dims(k)
    if any(x in seq for x in missing):
        raise InputError(f"--tiles needs --dims with the sequence dims ({', '.join(sorted(seq))}), e.g. --dims "
                         f"{','.join(f'{x}=1024' for x in sorted(seq))}")
    return {**{x: 64 for x in missing}, **dims}


def tiles_plot(k, path, dims: dict, dtype="bf16", device="h100") -> str:
    """Draw the (query tile, key tile) map of every output and branch: skipped / full / partial."""
    dims = tiles_dims(k, dims)
    plt = pyplot(path, "--tiles")
    from matplotlib.colors import ListedColormap   # optional dependency: only for plots
    from matplotlib.patches import Patch   # optional dependency: only for plots

    dt = canonical_dtype(dtype)
    panels = []
    notes = []
    for name in k.output_names:
        sched = k.schedules[name]
        cfg = k.planner.launch_config(name, torch.device("cpu" if device == "cpu" else "cuda"), dt, dims)
        runs = k.planner.schedule_for(name, dims, dt, "h100" if device == "cpu" else device)
        if runs.kind != sched.kind:   # a map is of (query tile, key tile) pairs: the tiled schedule's
            notes.append(f"output {name}: the tiled schedule's map; at these dims the runtime runs "
                         f"{onf.label(runs)} (moa explain)")
        for bi, b in enumerate(sched.branches):
            panels.append((name, bi, b, cfg, tile_map(k, name, bi, dims, cfg)))
    if not panels:
        raise MoaError("nothing to draw")
    cols = len(panels)
    # each tile drawn in its true proportions (BLOCK_M rows by BLOCK_N keys); the figure is sized to the panels,
    # so that constrained layout leaves no blank band between the titles and the maps
    pw = min(6.0, 16.0 / cols) if cols > 1 else 7.0
    tall = max(p[4].shape[0] * p[3].block_m / (p[4].shape[1] * p[3].block_n) for p in panels)
    true = 1 / 3 <= tall <= 3      # else (a map of one key tile, say) a readable box instead of a sliver
    ph = min(max(pw * tall, 2.2), 7.5) if true else 0.75 * pw
    fig = plt.figure(figsize=(pw * cols, ph + 2.5), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)
    cmap = ListedColormap(["#e8e8e8", "#1f4e9c", "#f29e38", "#d62728"])
    for ax, (name, bi, b, cfg, g) in zip(axes[0], panels):
        R, T = g.shape
        ax.imshow(g, cmap=cmap, vmin=0, vmax=3, interpolation="nearest",
                  aspect=cfg.block_m / cfg.block_n if true else "auto", origin="upper")
        ax.set_xticks(np.arange(0, T, -(-T // 8)))     # at most 8 evenly spaced integer ticks
        ax.set_yticks(np.arange(0, R, -(-R // 8)))
        counts = [int((g == v).sum()) for v in range(4)]
        title = f"{name}" + (f" branch {bi} ({b.kind})" if len(k.schedules[name].branches) > 1 else "")
        ax.set_title(f"{title}\nBLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n}: {R} x {T} tiles\n"
                     f"full {counts[1]}, partial {counts[2]}, skipped {counts[0]}"
                     + (f", visited-empty {counts[3]}" if counts[3] else ""), fontsize=9)
        ax.set_xlabel(f"key tile (BLOCK_N = {cfg.block_n} keys {b.var})")
        ax.set_ylabel(f"query tile (BLOCK_M = {cfg.block_m} rows)")
        if R <= 40 and T <= 40:
            ax.set_xticks(np.arange(-0.5, T, 1), minor=True)
            ax.set_yticks(np.arange(-0.5, R, 1), minor=True)
            ax.grid(which="minor", color="white", linewidth=0.6)
            ax.tick_params(which="minor", length=0)
    legend = [Patch(color="#1f4e9c", label="full (no mask code)"), Patch(color="#f29e38", label="partial (masked)"),
              Patch(color="#e8e8e8", label="skipped"), Patch(color="#d62728", label="visited, nothing admissible")]
    fig.legend(handles=legend, loc="outside lower center", ncol=2 if cols == 1 else 4, fontsize=9, frameon=False)
    shown = " ".join(f"{a}={v}" for a, v in dims.items())
    fig.suptitle(f"{k.program.name}: (query tile, key tile) map\n{shown}; {dt} tiles of "
                 f"{'the interpreter' if device == 'cpu' else 'the GPU runtime'}"
                 + (" (head 0)" if any(s.lead for s in k.schedules.values()) else "")
                 + "".join(f"\n{note}" for note in notes), fontsize=10)
    # the maps keep their aspect, so the layout leaves blank bands where the figure is taller than they need:
    # lay it out once, then take the unused height off the figure (the layout is redone when it is saved)
    fig.canvas.draw()
    w, h = fig.get_size_inches()
    spare = min((ax.get_position(original=True).height - ax.get_position().height) * h for ax in axes[0])
    if spare > 0.05:
        fig.set_size_inches(w, h - spare)
    save(fig, plt, path, "--tiles")
    print(f"wrote {path} ({', '.join(f'{p[0]}/{p[1]}: {p[4].shape[0]}x{p[4].shape[1]}' for p in panels)} tiles; "
          f"{sy.show(sum(int((p[4] > 0).sum()) for p in panels))} visited)")
    for note in notes:
        print(f"note: {note}")
    return path
