"""Typed SDK of the vmshift REST API."""

from vmshift.client.sdk import VmshiftClient

__all__ = ["VmshiftClient"]
