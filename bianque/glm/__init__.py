"""BianQue-2.0: a native PyTorch ChatGLM-6B (no remote code), its tokenizer, chat and the advisor."""
from .advisor import GLMAdvisor, V2Params, load_advisor
from .chat import process_response
from .config import GLMConfig
from .model import GLMForCausalLM
from .tokenizer import GLMTokenizer

__all__ = ["GLMAdvisor", "GLMConfig", "GLMForCausalLM", "GLMTokenizer", "V2Params", "load_advisor", "process_response"]
