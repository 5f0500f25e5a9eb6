"""gen1: structure- and content-guided video diffusion (Esser et al. 2023). No Ray in this package."""

__version__ = "0.1.0"
