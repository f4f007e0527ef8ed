"""Import-light registration of sdplugin-aesthetic (no torch here)."""

from __future__ import annotations
