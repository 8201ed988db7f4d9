"""SOLLOL: one OpenAI-compatible endpoint in front of many Ollama and llama.cpp nodes."""

__version__ = "0.1.0"
