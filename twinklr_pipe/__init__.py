"""twinklr_pipe: multi-stage async pipelines with a checkpointed, content-addressed cache."""

from __future__ import annotations

__version__ = "0.1.0"
