"""TensorFleet Model Service: a registry for ML models and their large files."""

__version__ = "0.1.0"
