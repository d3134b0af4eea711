"""Deploy and collect: a web chat whose conversations and ratings are written in the release's format."""
