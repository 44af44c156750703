"""The tools' errors: what a command-line tool reports to its user, never a request's answer.

Kept apart from `gateway.errors`, whose classes map to HTTP statuses and gRPC codes: a tool's
failure is an exit status, not a row of the serving error table.
"""

from __future__ import annotations


class ToolError(Exception):
    """Base of every error a tool reports; the CLI prints its message and exits non-zero."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
