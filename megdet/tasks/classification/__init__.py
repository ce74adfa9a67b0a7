"""Image classification with Goyal et al.'s recipe: megdet's second task."""
