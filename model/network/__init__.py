"""The network: a per-image backbone (Xception), the fusion of a product's images under the mask,
and the multi-image model that joins them. Knows tensors only: no files, no flags."""
