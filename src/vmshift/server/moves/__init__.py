"""Disk moves on the server: Storage vMotion, cold and suspended moves (issue 8).

``plan`` gathers what the pure checks need; ``runner`` is the task body that drives the agents'
disk-move jobs and records the outcome. Live migrations stay in ``server/migrations.py``.
"""
