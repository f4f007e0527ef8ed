"""Textual Inversion embeddings (A1111 .pt/.safetensors, diffusers .bin, SDXL) for sdcore"""

__version__ = "0.1.0"
