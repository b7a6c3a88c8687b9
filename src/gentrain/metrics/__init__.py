"""Sample-quality metrics: the feature spaces, the domain classifier, and the scores computed in them."""
