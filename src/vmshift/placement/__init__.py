"""The placement engine (issue 11): pure filters, weighers, the DRS recommender, initial placement and
the maintenance evacuation planner. Snapshots in, decisions with their reasons out; no I/O."""
