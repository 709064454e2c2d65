"""`ttt_helpers.inference.generate` under the name the chapters import: streaming generation and chat."""

from .inference.generate import Chat, new_cache, stream_generate

__all__ = ["Chat", "new_cache", "stream_generate"]
