"""On-disk layouts of quantized weights: the tensors and config each layout writes (write.py) and the
reader that recognises any supported layout and reads it back (read.py)."""
