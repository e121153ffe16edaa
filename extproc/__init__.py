"""Spendgate's ext_proc service: wrapped keys, token accounting and usage records for LLM traffic."""

__version__ = "0.1.0"
