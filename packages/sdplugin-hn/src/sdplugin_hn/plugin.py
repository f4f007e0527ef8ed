"""Import-light registration of sdplugin-hn (no torch here)."""

from __future__ import annotations
