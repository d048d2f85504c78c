"""Evaluation analysis: where a detector fails (COCO error breakdown, confusion matrix, worst images)."""
from .report import (AREAS, ERROR_TYPES, Analysis, ImageResult, ReportInputError, analyze, load_ground_truth,
                     load_results)

__all__ = ["AREAS", "ERROR_TYPES", "Analysis", "ImageResult", "ReportInputError", "analyze", "load_ground_truth",
           "load_results"]
