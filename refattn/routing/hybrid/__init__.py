"""Hybrid layers: local heads and routing heads side by side (registry name "routing_hybrid";
spec/routing.md, "Hybrid layers"). Registered by refattn/routing/__init__.py."""
