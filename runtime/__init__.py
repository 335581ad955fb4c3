"""Runtime: compile, cache, launch (CUDA or the Triton interpreter), float64 reference, measurement, AOT."""
