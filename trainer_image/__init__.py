"""The trainer: one site's round of local fine-tuning (`python -m fedtrain.trainer --config FILE`)."""
