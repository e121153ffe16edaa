"""Policies from git: which models a key may use, aliases, transforms, budgets and limits."""
