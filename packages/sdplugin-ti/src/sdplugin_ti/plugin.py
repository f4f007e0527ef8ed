"""Import-light registration of sdplugin-ti (no torch here)."""

from __future__ import annotations
