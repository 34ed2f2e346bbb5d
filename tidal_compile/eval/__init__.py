"""Quality evaluation: synthetic retrieval data, needle-in-a-haystack accuracy and attention recall."""
