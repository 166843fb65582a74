"""The network: a per-image backbone (Xception; backbone), the fusion of a product's images under
the mask (fusion), and the model that joins them (multi_image); keras_file reads a saved .keras back,
checked whole first. Knows tensors only: no flags, and no file but the .keras that keras_file reads."""
