"""Engines behind two small protocols (see ``protocols.py``); the driver never imports a concrete engine."""
