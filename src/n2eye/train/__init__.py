"""Training: the N2-Eye recipe on CRAG-MM and users chat datasets, one loop for every mode."""
