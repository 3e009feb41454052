"""Calendly: the source of event types."""
