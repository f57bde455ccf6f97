"""Transitional alias: the agent client lives in ``vmshift.client.agent``.

Kept only until ``server/migrations.py`` imports from the new home; then delete this file.
"""

from vmshift.client.agent import AgentClient, AgentHealth, AgentPool

__all__ = ["AgentClient", "AgentHealth", "AgentPool"]
