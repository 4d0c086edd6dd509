"""Bridges to tools outside PEFT and transformers (each imports its tool only when used)."""
