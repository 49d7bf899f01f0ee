"""Test support code: tiny models, oracles."""
