"""Import-light registration of sdplugin-lora (no torch here)."""

from __future__ import annotations
