"""DreamBooth full fine-tuning with prior preservation for sdcore"""

__version__ = "0.1.0"
