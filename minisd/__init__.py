"""minisd: a from-scratch, readable PyTorch reimplementation of Stable Diffusion 1.5 and 2.1."""
from .config import SD15, SD21_BASE, SD21_V, ModelConfig, TextConfig, UNetConfig, VAEConfig

__version__ = "0.1.0"
