"""Data sources, preprocessing and the grain input pipeline."""
