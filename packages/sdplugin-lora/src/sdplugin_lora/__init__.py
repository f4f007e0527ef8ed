"""LoRA and LoCon training, kohya-format files, merge/extract/resize for sdcore"""

__version__ = "0.1.0"
