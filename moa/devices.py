"""Device table for the cost model: peak rates, memory system and per-block limits of the GPUs we predict for.

Every number is a vendor figure (dense, i.e. without 2:4 sparsity) or derived from vendor figures as stated:
- H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h100/, "H100 SXM"
  column) and the "NVIDIA H100 Tensor Core GPU Architecture" whitepaper (GTC 2022, table 3): FP64 34 TF/s,
  FP64 tensor core 67 TF/s, FP32 67 TF/s, TF32 tensor core 494.7 TF/s, BF16/FP16 tensor core 989.4 TF/s,
  HBM3 3.35 TB/s, 50 MB L2, 132 SMs, 228 KB shared memory per SM.
- H200 SXM: NVIDIA H200 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h200/): the same
  Hopper SM array as H100 SXM (same compute peaks), HBM3e 4.8 TB/s, 141 GB.
- A100 SXM4 80GB: NVIDIA A100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/a100/) and the
  "NVIDIA A100 Tensor Core GPU Architecture" whitepaper: FP64 9.7 TF/s, FP64 tensor core 19.5 TF/s, FP32
  19.5 TF/s, TF32 156 TF/s, BF16/FP16 312 TF/s, HBM2e 2.039 TB/s, 40 MB L2, 108 SMs, 164 KB shared per SM.
- Per-block limits (shared memory opt-in 227 KB on compute capability 9.0, 163 KB on 8.0; 255 registers per
  thread; 64 K 32-bit registers per SM): CUDA C++ Programming Guide, "Technical Specifications per Compute
  Capability" table.
- Transcendental throughput: the CUDA C++ Programming Guide "Arithmetic Instructions" throughput table gives 16
  results per clock per SM for the MUFU functions (exp2, log2, sin, cos, rsqrt, sqrt approximations) on
  compute capability 8.0 and 9.0. Rate = 16 * SMs * clock, with the clock implied by the tensor peak:
  H100/H200 989.4e12 / (132 SMs * 4096 dense BF16 flops per SM per clock) = 1.83 GHz -> 3.87e12 exp/s;
  A100 312e12 / (108 * 2048) = 1.41 GHz -> 2.44e12 exp/s. float64 transcendentals are software sequences (no
  MUFU): we charge 25 FP64 operations each (an estimate, not a vendor figure).
- Kernel launch overhead: 5 us (an estimate: launch latency plus the tail of the last wave).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError

# canonical dtype names and their aliases
DTYPE_ALIASES = {
    "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64",
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "tf32": "tf32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
DTYPE_BYTES = {"float64": 8, "float32": 4, "tf32": 4, "float16": 2, "bfloat16": 2}


def canonical_dtype(dtype) -> str:
    """'bf16', 'bfloat16', torch.bfloat16 ... -> 'bfloat16' (likewise float16, float32, float64, tf32)."""
    text = str(dtype).replace("torch.", "").lower()
    if text not in DTYPE_ALIASES:
        raise InputError(f"unknown dtype {dtype!r}; use one of float64, float32, float16, bfloat16 "
                         f"(or fp64, fp32, fp16, bf16)")
    return DTYPE_ALIASES[text]



def occupancy(programs, sms: int) -> float:
    """min(1, programs / SMs): the share of a device of `sms` SMs a launch of `programs` programs keeps busy
    (Device.occupancy); 1 for a launch of no program, which costs its launch overhead only."""
    return min(1.0, programs / sms) if programs else 1.0

@dataclass(frozen=True)
class Device:
    """Peak rates (per second), memory system and per-block limits of one GPU."""
    name: str
    target: str                   # AOT target (runtime/aot.py)
    sms: int
    clock_hz: float               # clock implied by the dense tensor peak (see module docstring)
    tensor_flops: dict            # dtype -> dense matrix-multiply peak (tensor cores; fp32 = CUDA cores)
    vector_flops: dict            # dtype -> non-matrix arithmetic peak (CUDA cores)
    hbm_bytes_per_s: float
    l2_bytes: int
    shared_per_sm: int
    shared_per_block: int
    registers_per_thread: int = 255
    registers_per_sm: int = 64 * 1024
    mufu_per_sm_per_clock: int = 16
    fp64_ops_per_transcendental: int = 25
    launch_s: float = 5e-6
    sources: tuple = field(default=(), compare=False)

    def occupancy(self, programs) -> float:
        """The share of the device a launch of `programs` programs keeps busy: min(1, programs / SMs). One program
        runs on one SM at 1/SMs of the device's peaks and bandwidth (the split-KV model's assumption,
        moa/splitkv.py), so a launch of fewer programs than SMs takes SMs / programs times its roofline (a scan
        over batch x heads x feature tiles, one head of few row tiles). Waves beyond the first are not modelled."""
        return occupancy(programs, self.sms)

    def transcendental_rate(self, dtype: str) -> float:
        """Transcendental evaluations per second for the accumulation dtype of a kernel."""
        if canonical_dtype(dtype) == "float64":
            return self.vector_flops["float64"] / self.fp64_ops_per_transcendental
        return self.mufu_per_sm_per_clock * self.sms * self.clock_hz

    def matmul_rate(self, dtype: str) -> float:
        """Peak of tl.dot for the kernel's input dtype. float32 dots use input_precision="ieee" (no TF32), so
        they run on the CUDA cores at the FP32 rate."""
        return self.tensor_flops[canonical_dtype(dtype)]

    def peak_flops(self, dtype: str) -> float:
        """Dense matrix-multiply peak for a dtype (alias of matmul_rate, used by the form choice)."""
        return self.matmul_rate(dtype)

    @property
    def dram_bandwidth(self) -> float:
        """HBM bytes per second."""
        return self.hbm_bytes_per_s

    def vector_rate(self, dtype: str) -> float:
        """Peak of elementwise arithmetic: float64 kernels compute in float64, all others accumulate in float32."""
        return self.vector_flops["float64" if canonical_dtype(dtype) == "float64" else "float32"]


_HOPPER_SOURCES = ("NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column",
                   "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), table 3",
                   "CUDA C++ Programming Guide: technical specifications per compute capability; arithmetic "
                   "instruction throughput")

DEVICES: dict = {
    "h100": Device(
        name="NVIDIA H100 SXM5 80GB", target="sm_90", sms=132, clock_hz=1.83e9,
        tensor_flops={"float64": 67e12, "float32": 67e12, "tf32": 494.7e12, "float16": 989.4e12,
                      "bfloat16": 989.4e12},
        vector_flops={"float64": 34e12, "float32": 67e12},
        hbm_bytes_per_s=3.35e12, l2_bytes=50 * 1024 ** 2, shared_per_sm=228 * 1024, shared_per_block=227 * 1024,
        sources=_HOPPER_SOURCES),
    "h200": Device(
        name="NVIDIA H200 SXM 141GB", target="sm_90", sms=132, clock_hz=1.83e9,
        tensor_flops={"float64": 67e12, "float32": 67e12, "tf32": 494.7e12, "float16": 989.4e12,
                      "bfloat16": 989.4e12},
        vector_flops={"float64": 34e12, "float32": 67e12},
        hbm_bytes_per_s=4.8e12, l2_bytes=50 * 1024 ** 2, shared_per_sm=228 * 1024, shared_per_block=227 * 1024,
        sources=("NVIDIA H200 Tensor Core GPU datasheet", *_HOPPER_SOURCES[1:])),
    "a100": Device(
        name="NVIDIA A100 SXM4 80GB", target="sm_80", sms=108, clock_hz=1.41e9,
        tensor_flops={"float64": 19.5e12, "float32": 19.5e12, "tf32": 156e12, "float16": 312e12,
                      "bfloat16": 312e12},
        vector_flops={"float64": 9.7e12, "float32": 19.5e12},
        hbm_bytes_per_s=2.039e12, l2_bytes=40 * 1024 ** 2, shared_per_sm=164 * 1024, shared_per_block=163 * 1024,
        sources=("NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)",
                 "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020)",
                 "CUDA C++ Programming Guide: technical specifications per compute capability; arithmetic "
                 "instruction throughput")),
}


def get_device(name) -> Device:
    """'h100' / 'H100' / a Device -> the Device."""
    if isinstance(name, Device):
        return name
    key = str(name).lower().replace("nvidia", "").replace("-", "").replace("_", "").strip()
    for k in DEVICES:
        if key.startswith(k):
            return DEVICES[k]
    raise InputError(f"unknown device {name!r}; the device table has {', '.join(sorted(DEVICES))} "
                     f"(use device='cpu' for the interpreter's tile choice without a time prediction)")


get = get_device
