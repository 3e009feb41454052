"""Calendly's API as closesync calls it: users, event types, organization memberships, OAuth."""
