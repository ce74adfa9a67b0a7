"""The training engine: loop, checkpoints, events. It knows nothing about detection."""
