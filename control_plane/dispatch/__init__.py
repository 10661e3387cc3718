"""Live worker sessions on this replica and the push dispatch that feeds them."""
