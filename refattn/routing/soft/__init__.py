"""Soft routing over attention paths (registry name "soft_routing"; spec/routing.md,
"Soft routing"). Registered by refattn/routing/__init__.py."""
