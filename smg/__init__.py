"""smg: a fast model gateway for LLM inference workers (SGLang, vLLM)."""

__version__ = "0.1.0"
