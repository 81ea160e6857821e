"""reid-deploy: person re-identification from spec to deployment."""

__version__ = "0.1.0"
