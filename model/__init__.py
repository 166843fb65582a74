"""The tf.data input pipeline and the multi-image Xception."""
