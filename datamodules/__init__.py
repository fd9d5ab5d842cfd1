"""Streaming DataModules over counter-based synthetic data."""
