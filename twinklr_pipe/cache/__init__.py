"""The content-addressed stage cache."""

from __future__ import annotations
