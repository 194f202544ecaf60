"""The user's footage: images and videos to start from, fitted to the video size, and their fingerprints."""
