"""The commands of the command line (click: parse, call the library, format), one module per group of commands,
with their shared output and options; and the library side of inspect and verify (inspection.py, verify.py)."""
