"""The control plane: the round engine and its drivers (local processes, and Kubernetes)."""
