"""The library side of the read-only commands: inspect and verify (cli.py parses and prints)."""
