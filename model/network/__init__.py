"""The network: a per-image backbone (Xception; backbone), the fusion of a product's images under
the mask (fusion), and the model that joins them (multi_image). Knows tensors only: no files, no
flags."""
