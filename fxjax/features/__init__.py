"""Feature extraction (`extract`) and the on-disk feature cache (`store`)."""
