"""Training: the run (loop), what it feeds Keras (inputs), where it runs (distribution), how it
learns (optimization), what it reports and backs up (callbacks, sample_grid), how it resumes
(run_state), and the final model's BatchNorm statistics (batchnorm)."""
