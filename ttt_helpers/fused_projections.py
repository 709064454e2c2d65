"""`ttt_helpers.inference.fused_projections` under the name the chapters import."""

from .inference.fused_projections import FusedProjections

__all__ = ["FusedProjections"]
