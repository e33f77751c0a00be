"""Selecting and loading a pre-trained backbone: resolving a name (`hub`), reading weight files (`formats`),
the model families and their conversion tables (`families`), and the loaded bundle (`backbone`)."""
