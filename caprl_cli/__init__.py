"""caprl-cli: caption large image collections with CapRL models for dataset pre-annotation."""

__version__ = "0.1.0"
