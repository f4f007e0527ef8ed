"""Import-light registration of sdplugin-apt (no torch here)."""

from __future__ import annotations
