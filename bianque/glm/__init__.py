"""BianQue-2.0: a native PyTorch ChatGLM-6B (no remote code), its tokenizer, chat and the advisor."""
from .config import GLMConfig
from .model import GLMForCausalLM
from .tokenizer import GLMTokenizer

__all__ = ["GLMConfig", "GLMForCausalLM", "GLMTokenizer"]
