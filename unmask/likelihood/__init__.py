"""Likelihoods: the estimators, the ELBO, the block bound, the policy likelihood, scoring."""
