"""Helpers shared by the golden generators in xtask/goldens/ (imported, never run by xtask)."""
