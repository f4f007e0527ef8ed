"""Import-light registration of sdplugin-dreambooth (no torch here)."""

from __future__ import annotations
