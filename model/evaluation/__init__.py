"""Evaluation: predictions over a split (predict), their accuracy figures (metrics), the
duplicate-image lookup (duplicates), the members of an ensemble and how their probabilities
combine (ensemble), top_k.npz (top_k_file), report.png (report), submission.csv (submission), and
the run that ties them together (evaluate). Needs a trained model_dir, never the train loop."""
