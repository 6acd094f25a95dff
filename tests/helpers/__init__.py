"""Helpers shared by both test tiers."""
