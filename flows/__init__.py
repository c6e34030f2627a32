"""Dataset-scale LRP pipeline: data, models, training, explaining and orchestration."""
