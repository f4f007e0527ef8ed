"""DreamArtist / Advanced Prompt Tuning (positive + negative embeddings) for sdcore"""

__version__ = "0.1.0"
