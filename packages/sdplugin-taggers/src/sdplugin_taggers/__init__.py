"""WD14 (onnxruntime), DeepDanbooru and BLIP+CLIP dataset taggers for sdcore"""

__version__ = "0.1.0"
