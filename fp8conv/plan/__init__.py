"""Deciding before writing: validated schemes and recipes, model-family rules, engine constraints,
fused sets, per-tensor decisions and the whole conversion plan (shards, byte offsets)."""
