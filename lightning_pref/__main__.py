"""``python -m lightning_pref ...`` is the ``lightning-pref`` command (multi-process launchers re-run it)."""

from lightning_pref.cli import console

console()
