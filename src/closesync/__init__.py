"""closesync keeps each Close user's scheduling links equal to their Calendly event types."""

__version__ = "0.1.0"
