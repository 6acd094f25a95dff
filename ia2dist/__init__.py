"""ia2dist: distributed IA2 (ICL Activation Alignment) trainer."""

__version__ = "0.1.0"
