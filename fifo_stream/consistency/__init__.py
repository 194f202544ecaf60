"""Consistency controls (the Q-cache, the reference K/V bank) and storyboards of prompts."""
