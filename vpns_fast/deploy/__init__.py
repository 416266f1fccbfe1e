"""Deployment: export formats (``vpns_fast.deploy.export``, imported on first use: it pulls in the file
formats), channel slimming, the CPU sparse engine and the deployed runtime."""
from vpns_fast.deploy.runtime import DeployedModel, SparseEngineUnavailableWarning, benchmark_inference, deploy
from vpns_fast.deploy.sparse_cpu import PrunedWeightsLeftDenseWarning, RoundingAmplifiedWarning

__all__ = ["DeployedModel", "PrunedWeightsLeftDenseWarning", "RoundingAmplifiedWarning",
           "SparseEngineUnavailableWarning", "benchmark_inference", "deploy"]
