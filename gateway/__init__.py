"""modelyard: one front door for model inference."""

from __future__ import annotations

__version__ = "0.1.0"
