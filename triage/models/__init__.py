"""Detection and segmentation models, bundles, training, evaluation and Grad-CAM."""
