"""Orbit's command line: thin Typer modules over orbit_core."""
