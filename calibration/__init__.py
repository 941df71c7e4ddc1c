"""INT8 calibration: COCO person crops → explicit Q/DQ `int8` variant (vision W8A8, decoder weight-only int8)."""
from __future__ import annotations

from .calibrate import METHODS, CalibrationConfig, CalibrationResult, calibrate_bundle
from .qdq import QuantizationError, check_decoder_qdq, check_vision_qdq, qdq_scales

__all__ = ["METHODS", "CalibrationConfig", "CalibrationResult", "QuantizationError", "calibrate_bundle",
           "check_decoder_qdq", "check_vision_qdq", "qdq_scales"]
