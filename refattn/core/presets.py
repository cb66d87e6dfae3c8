"""The one sentinel for "take this parameter from the preset".

A mechanism with compatibility presets (LSH, routing) gives each parameter a
preset can set the default :data:`FROM_PRESET`; its ``check_inputs`` replaces
it with the preset's value (or the canonical one when no preset is named).
An explicit value always wins over the preset.
"""

from __future__ import annotations


class _FromPreset:
    """The type of :data:`FROM_PRESET`: one instance, printed as its name."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "FROM_PRESET"

    def __reduce__(self):
        return (_FromPreset, ())


FROM_PRESET = _FromPreset()
