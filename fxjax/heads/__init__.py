"""Heads and their training: the head modules, which parameters train (`freeze`), optimisers and the engine."""
