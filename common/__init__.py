"""Pieces every dvd-serve component shares: config base class, error shape, checkpoint formats, torch quirks."""
