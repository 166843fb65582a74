"""Training: the run (loop), what it feeds Keras (inputs), where it runs (distribution), how it
learns (optimization), what it reports and backs up (callbacks, sample_grid), how it resumes
(run_state, and random_states for the Keras seed generators), one trainer per model_dir
(run_lock), a start from another model's weights (init_from), whether the input keeps up
(input_check), and the final model's BatchNorm statistics (batchnorm)."""
