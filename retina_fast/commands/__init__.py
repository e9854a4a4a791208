"""Subcommands of the ``retina-fast`` CLI (see retina_fast/cli.py)."""
