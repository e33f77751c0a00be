"""fxjax: transfer learning by feature extraction in JAX/Flax."""

__version__ = "0.2.0"


def __getattr__(name: str):
    # Lazy so that `import fxjax.backbones.formats` does not pull in every model family.
    if name == "load_backbone":
        from fxjax.backbones.hub import load_backbone

        return load_backbone
    if name == "load_classifier":
        from fxjax.runs.export import load_classifier

        return load_classifier
    raise AttributeError(f"module 'fxjax' has no attribute {name!r}")
