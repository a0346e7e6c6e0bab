"""Memory techniques as named, composable pieces around the training loop."""
