"""Which attention kernels training lets torch pick on a GPU.

torch 2.11 is the first release whose bundled cuDNN makes cuDNN's scaled-dot-product-attention
kernels torch's first choice on Hopper GPUs (H100/H200), and those kernels have open backward bugs
upstream (wrong or NaN gradients for some shapes). What sdcore measured on an H200 with torch
2.11.0+cu130 (2026-11-30, ``benchmarks/gpu_sdpa_probe.py``; ``benchmarks/RESULTS.md``):

- one double and one single Flux block at FLUX.1's width, bf16, gradient checkpointing: the input
  gradient's norm was 110.7 with torch's default kernels and 0.00137 with cuDNN's turned off, while
  plain attention at the same shapes agreed across all kernels;
- tiny Flux trained through the runtime stopped at step 1 with a NaN gradient norm;
- the FLUX.1-size LoRA step died in backward with an illegal memory access.

So training turns cuDNN's attention kernels off on CUDA unless ``--cudnn-attention`` asks for them;
flash and memory-efficient attention stay as torch chooses. The setting is process-wide in torch,
so it is put back when the run ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def restrict_attention_kernels(device: Any, *, allow_cudnn: bool) -> Callable[[], None]:
    """Turn cuDNN's SDPA kernels off for a run on ``device`` (a CUDA device, unless allowed);
    returns the function that restores the previous setting."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda" or allow_cudnn:
        return lambda: None
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    return lambda: torch.backends.cuda.enable_cudnn_sdp(before)
