"""Kernels of programs that read a paged KV cache through a block table in the language (moa/paging.py): the
paging of each such kernel, and the translation of a call's page pools and table into the paged decode's
arguments (runtime/decode.py: the pools flattened along (pages, page size), the table as block_table)."""
from __future__ import annotations

import weakref

import torch

from moa.errors import InputError

_PAGING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register(kernel, paging) -> None:
    _PAGING[kernel] = paging


def paging_of(kernel):
    """The kernel's Paging (moa/paging.py), or None."""
    return _PAGING.get(kernel)


def unpage(kernel, inputs: dict) -> tuple[dict, torch.Tensor, int]:
    """(inputs with every page pool flattened to [..., pages x page size, rest], block table, page size)."""
    pg = _PAGING[kernel]
    if pg.table not in inputs:
        raise InputError(f"missing input {pg.table} (the block table of the paged inputs "
                         f"{', '.join(pg.inputs)})")
    out = {n: t for n, t in inputs.items() if n != pg.table}
    decl = kernel.program.input_map
    page = None
    for name in pg.inputs:
        t = out.get(name)
        rest = len(decl[name].shape) - 1      # the lowered input: [m, rest...]; the pool: [pages, P, rest...]
        if not isinstance(t, torch.Tensor) or t.dim() < rest + 2:
            raise InputError(f"input {name} must be a page pool [..., pages, page size"
                             f"{', ...' if rest else ''}], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        size = t.shape[t.dim() - rest - 1]
        if page is not None and size != page:
            raise InputError(f"the page pools have different page sizes ({page} and {size} in {name})")
        page = size
        out[name] = t.flatten(t.dim() - rest - 2, t.dim() - rest - 1)
    if getattr(pg.page, "is_Integer", False) and int(pg.page) != page:   # a page size fixed by a param
        raise InputError(f"the program's page size is {pg.page}, the pools hold pages of {page}")
    return out, inputs[pg.table], page


def contiguous(kernel, inputs: dict) -> dict:
    """The call's inputs with each page pool gathered into the contiguous cache it stands for (the float64
    reference runs on these)."""
    flat, table, page = unpage(kernel, inputs)
    pg = _PAGING[kernel]
    decl = kernel.program.input_map
    if not isinstance(table, torch.Tensor) or table.is_floating_point() or table.dtype == torch.bool:
        raise InputError(f"the block table {pg.table} must be an integer tensor")
    for name in pg.inputs:
        rest = len(decl[name].shape) - 1
        t = flat[name]
        ax = t.dim() - rest - 1
        pages = t.shape[ax] // page
        if table.numel() and not bool(((table >= 0) & (table < pages)).all()):   # every entry is gathered here
            raise InputError(f"block table {pg.table} entries must be pages 0 .. {pages - 1} of the pool {name}, "
                             f"got {int(table.min())} .. {int(table.max())}")
        keys = (table.long()[..., :, None] * page + torch.arange(page, device=table.device)).flatten(-2)
        keys = keys.to(t.device)
        if keys.dim() == 1:
            flat[name] = t.index_select(ax, keys)
            continue
        # a table per batch index: gather each batch index's keys from its pool (or the shared one)
        try:
            batch = torch.broadcast_shapes(t.shape[:ax], keys.shape[:-1])
        except RuntimeError:
            raise InputError(f"the block table's batch axes {list(keys.shape[:-1])} do not broadcast with those of "
                             f"the pool {name} {list(t.shape[:ax])}") from None
        rest_shape = list(t.shape[ax + 1:])
        src = t.expand(*batch, *t.shape[ax:])
        idx = keys.expand(*batch, keys.shape[-1]).reshape(*batch, keys.shape[-1], *([1] * rest))
        flat[name] = torch.gather(src, len(batch), idx.expand(*batch, keys.shape[-1], *rest_shape))
    return flat
