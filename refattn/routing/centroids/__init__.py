"""Centroid updates of routing attention (registry name "centroid_ema"; spec/routing.md,
"Centroid updates"). Registered by refattn/routing/__init__.py."""
