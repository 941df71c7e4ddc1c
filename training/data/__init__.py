"""Datasets for PoseLLM: procedural synthetic COCO person-keypoint data."""
