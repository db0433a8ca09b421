"""Ensembles of sparse tickets and their metrics: :class:`Ensemble` (mean of the members'
softmax), accuracy / NLL / ECE, pairwise prediction disagreement, and BatchNorm
recalibration for models whose weights changed outside training."""

from ..methods.batchnorm import recalibrate_batchnorm
from .metrics import disagreement, expected_calibration_error, metrics, pairwise_disagreement
from .module import Ensemble

__all__ = ["Ensemble", "metrics", "expected_calibration_error", "disagreement", "pairwise_disagreement",
           "recalibrate_batchnorm"]
