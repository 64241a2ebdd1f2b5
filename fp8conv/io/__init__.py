"""Bytes on disk: the safetensors header parser and reader/writer, checkpoints (shards, index), the
atomic output folder and its journal, incremental hashing, and strict parsing of untrusted JSON."""
