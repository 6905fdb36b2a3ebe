"""The control plane: a QMP-style JSON socket and its client."""
