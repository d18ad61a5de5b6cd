"""fedtrain: federated fine-tuning of vision models across sites that never share raw data."""

__version__ = "0.1.0"
