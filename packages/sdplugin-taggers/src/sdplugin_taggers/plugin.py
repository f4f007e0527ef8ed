"""Import-light registration of sdplugin-taggers (no torch here)."""

from __future__ import annotations
