"""auto-correct-labels: find and fix mislabelled images in class-folder datasets."""
