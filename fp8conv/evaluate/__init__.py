"""The model's own outputs: `fp8conv eval` runs source and quantized checkpoints and compares them.
quality.py (torch-free) holds results, gates and the eval file; models.py (the `eval` extra) runs them."""
