"""Pure domain types and enums shared by all layers (no I/O here)."""
