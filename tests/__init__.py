"""The test suite: unit/, integration/ and deploy/ (docs/testing.md)."""
