"""Inventory database: schema, engine, migrations."""
