"""Aesthetic embeddings and aesthetic-gradient personalisation for sdcore"""

__version__ = "0.1.0"
