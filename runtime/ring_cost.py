"""What the ring's cost predictions share: the interconnect table, RingCost, and the cost of a program whose ranks
exchange once and then compute once (the halo exchange, the linear form across ranks)."""
from __future__ import annotations

from dataclasses import dataclass, field

from moa.errors import InputError


# One-direction bandwidth of the link a rank sends its key shard over (the ring sends to one neighbour while
# receiving from the other: full duplex, so the per-direction figure bounds each step's transfer).
INTERCONNECTS = {
    "nvlink4": (450e9, "NVLink 4 (H100 SXM): 900 GB/s total bidirectional per GPU = 450 GB/s each way "
                       "(NVIDIA H100 Tensor Core GPU datasheet)"),
    "nvlink3": (300e9, "NVLink 3 (A100 SXM): 600 GB/s total bidirectional per GPU = 300 GB/s each way "
                       "(NVIDIA A100 Tensor Core GPU datasheet)"),
    "pcie5": (64e9, "PCIe 5.0 x16: 32 GT/s x 16 lanes, 128b/130b encoding = 63 GB/s each way (PCI-SIG PCIe 5.0 "
                    "base specification)"),
    "pcie4": (32e9, "PCIe 4.0 x16: 16 GT/s x 16 lanes, 128b/130b encoding = 31.5 GB/s each way (PCI-SIG PCIe 4.0 "
                    "base specification)"),
    "ib_ndr": (50e9, "InfiniBand NDR: 400 Gb/s per port = 50 GB/s each way (NVIDIA ConnectX-7 / Quantum-2 "
                     "product briefs)"),
    "ib_hdr": (25e9, "InfiniBand HDR: 200 Gb/s per port = 25 GB/s each way (NVIDIA ConnectX-6 product brief)"),
}
LINK_LATENCY = 10e-6  # seconds per step and message: an assumption (a few us of NCCL p2p launch + wire latency)


@dataclass
class RingCost:
    """Predicted ring attention on `ranks` devices (equal contiguous shards unless given). Lists are per rank;
    step lists are per rank and ring step (step t computes the key shard of rank (r - t) mod P)."""
    ranks: int
    interconnect: str
    interconnect_bandwidth: float          # bytes/s, one direction
    interconnect_source: str
    device: str
    dtype: str
    flops: list                            # per rank, over its computed blocks
    transcendentals: list
    dram_bytes: list
    compute_seconds: list                  # per rank
    step_compute_seconds: list             # [rank][step] (0 for a skipped block)
    bytes_sent: list                       # per rank, over the P - 1 transfers
    step_bytes_sent: list                  # [rank][step] (0 at the last step)
    step_transfer_seconds: list            # [rank][step]
    hides: bool                            # every transfer no longer than the compute it overlaps
    exposed_seconds: list                  # per rank: transfer time not hidden behind compute
    blocks_skipped: int                    # (query shard, key shard) pairs with no admissible (i, j)
    blocks_total: int
    predicted_seconds: float               # lockstep ring: sum over steps of the slowest rank's max(compute, send)
    single_device_flops: float             # the same program on one device (for comparison)
    single_device_seconds: float
    blocks: list = field(default_factory=list)   # [rank][step] CostReport of the block (None: skipped)
    form: str = "softmax"                  # "linear": one step per rank, the all_gather of the states (ring_linear);
                                           # "halo": one step per rank, the halo rows sent before it (ring_halo)

    def summary(self) -> str:
        if self.form == "halo":
            return (f"halo exchange across {self.ranks} x {self.device} ({self.dtype}), {self.interconnect} "
                    f"{self.interconnect_bandwidth / 1e9:g} GB/s each way: per-rank FLOPs "
                    f"{min(self.flops):.3g}..{max(self.flops):.3g}, halo bytes sent per rank "
                    f"{max(self.bytes_sent):.3g} ({max(self.exposed_seconds) * 1e6:.1f} us, before the compute), no "
                    f"K/V rotation, predicted {self.predicted_seconds * 1e6:.1f} us")
        if self.form == "linear":
            return (f"linear form across {self.ranks} x {self.device} ({self.dtype}), {self.interconnect} "
                    f"{self.interconnect_bandwidth / 1e9:g} GB/s each way: per-rank FLOPs "
                    f"{min(self.flops):.3g}..{max(self.flops):.3g}, all_gather of the states: bytes sent per rank "
                    f"{max(self.bytes_sent):.3g} ({max(self.exposed_seconds) * 1e6:.1f} us, not overlapped), no "
                    f"K/V rotation, predicted {self.predicted_seconds * 1e6:.1f} us")
        return (f"ring on {self.ranks} x {self.device} ({self.dtype}), {self.interconnect} "
                f"{self.interconnect_bandwidth / 1e9:g} GB/s each way: per-rank FLOPs "
                f"{min(self.flops):.3g}..{max(self.flops):.3g}, bytes sent per rank {max(self.bytes_sent):.3g}, "
                f"blocks skipped {self.blocks_skipped}/{self.blocks_total}, transfer "
                f"{'hidden' if self.hides else 'exposed'} (max {max(self.exposed_seconds) * 1e6:.1f} us), "
                f"predicted {self.predicted_seconds * 1e6:.1f} us")


def one_exchange_cost(ranks, interconnect, bw, source, device, dtype, nl, rank_cost, sent, tx, hidden, single,
                      form) -> RingCost:
    """RingCost of a program whose ranks exchange once, then compute once (halo, linear form): rank_cost(r) ->
    (flops, transcendentals, DRAM bytes, seconds, CostReport) of a non-empty rank r; sent[r] and tx[r] its bytes
    and transfer time; the prediction is the slowest rank's transfer + compute."""
    rows = [rank_cost(r) if nl[r] else (0, 0, 0, 0.0, None) for r in range(ranks)]
    flops, trans, dbytes, comp, reports = (list(x) for x in zip(*rows))
    return RingCost(ranks, interconnect, bw, source, device, dtype, flops, trans, dbytes, comp, [[c] for c in comp],
                    sent, [[x] for x in sent], [[t] for t in tx], hidden, tx, sum(1 for x in nl if not x), ranks,
                    max(c + t for c, t in zip(comp, tx)), single.flops, single.predicted_seconds,
                    [[r] for r in reports], form=form)


def aligned_shards(n: int, ranks: int, shards, what: str) -> list:
    """Per-rank row counts for a cost prediction of a program whose query and key shards coincide: `shards`
    ((query lengths, key lengths) or None: as even as possible), checked."""
    if shards is None:
        return [n * (r + 1) // ranks - n * r // ranks for r in range(ranks)]
    nl = list(shards[0])
    if len(nl) != ranks or sum(nl) != n or (len(shards) > 1 and list(shards[1]) != nl):
        raise InputError(f"shards must give {ranks} lengths summing to {n}, the same for queries and keys ({what} "
                         "needs each rank's query and key shards to coincide)")
    return nl
