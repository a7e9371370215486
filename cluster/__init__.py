"""Where things run and live: the Ray connection and storage URIs."""
