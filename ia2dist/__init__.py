"""ia2dist: distributed IA2 (ICL Activation Alignment) trainer.

``ia2dist.run(config, overrides)`` runs an experiment from Python (see ``ia2dist.api``);
``ia2dist.load_config`` resolves and checks a config. Importing the package loads neither torch nor
Ray: they come with the first call.
"""

__version__ = "0.1.0"
__all__ = ["run", "load_config", "__version__"]


def __getattr__(name):
    if name in ("run", "load_config"):
        from ia2dist import api

        return getattr(api, name)
    raise AttributeError(f"module 'ia2dist' has no attribute {name!r}")
