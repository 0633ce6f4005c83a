"""Model loading, configuration and the native transformer."""
