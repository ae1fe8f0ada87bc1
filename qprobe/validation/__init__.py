"""Data validation: Great Expectations suites plus Python checks for every dataset the pipeline writes."""

from qprobe.validation.core import Suite, ValidationError, require, run_expectations, validate

__all__ = ["Suite", "ValidationError", "require", "run_expectations", "validate"]
