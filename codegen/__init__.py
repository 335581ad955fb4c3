"""Triton code generation from the Operational Normal Form."""
