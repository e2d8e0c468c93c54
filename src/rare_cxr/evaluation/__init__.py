"""Evaluation: metrics, patient bootstrap, model cost, Grad-CAM, figures and the HTML report.

Everything here is plain functions on arrays/DataFrames so the reporting pipeline's nodes stay
thin wrappers and every number can be unit-tested against scikit-learn without Kedro.
"""
