"""Typed exceptions of the PoseLLM edge runtime.

Library code raises these with the offending value and the fix; only the CLI maps them to exit codes.
"""

from __future__ import annotations

__all__ = ["PoseLLMEdgeError", "InputError", "BundleError"]


class PoseLLMEdgeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class InputError(PoseLLMEdgeError, ValueError):
    """Bad user input: an unreadable image, an invalid person box, a malformed annotation file."""


class BundleError(PoseLLMEdgeError):
    """A model bundle is missing, corrupt, or does not match what the runtime expects."""
