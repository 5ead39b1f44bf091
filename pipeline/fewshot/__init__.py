"""In-context few-shot segmentation by fine-tuning a diffusion UNet with KV fusion (DiffewS).

`kv_fusion` lets a query's self-attention attend to its supports' keys and values, `model` is
the UNet with its support stem and the one-step prediction, `masks` turns binary masks into
image-like maps and predicted maps back into masks.
"""
