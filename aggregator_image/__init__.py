"""The aggregator: validates site updates and folds them into the next global model."""
