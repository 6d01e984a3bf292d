"""Kubernetes service discovery."""
