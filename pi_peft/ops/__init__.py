"""Tensor-level pieces shared by the tuners, training and evaluation: S²-Attn, the tiled MLP, chunked losses, the
bitsandbytes CPU guard."""
