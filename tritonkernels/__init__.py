"""Triton kernels of fastguide: the fused guidance + Euler/ancestral, Heun and DPM-Solver++(2M) ops
for CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), one file per op.  Same signatures as
fastguide.reference."""
from tritonkernels.guided_dpmpp_2m import guided_dpmpp_2m
from tritonkernels.guided_euler import guided_euler
from tritonkernels.guided_heun import guided_heun

__all__ = ["guided_dpmpp_2m", "guided_euler", "guided_heun"]
