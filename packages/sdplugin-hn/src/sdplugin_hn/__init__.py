"""A1111-format Hypernetworks for sdcore"""

__version__ = "0.1.0"
