"""Test-Time Training layers for language models."""
