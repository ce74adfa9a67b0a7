"""Tasks supply model, data and evaluation; the engine knows nothing about detection."""
