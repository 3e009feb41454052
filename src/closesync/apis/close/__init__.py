"""Close's API as closesync calls it: the current user, scheduling links, OAuth."""
