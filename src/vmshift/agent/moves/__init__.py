"""Disk moves run by this agent: Storage vMotion, cold and suspended moves (docs/design/contracts.md).

``jobs.py`` is the registry (start, progress, cancel, recovery at start-up) and defines the one
mover interface; each kind is a module: ``storage.py`` (STORAGE), ``cold.py`` (COLD, SUSPENDED).
"""
