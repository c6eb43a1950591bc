"""`featshard serve`: the HTTP search service (command, app, state, batcher, uploads, row files, thumbnails, load
tester) and its page (static/)."""
