"""Tests with teepsi processes or servers on loopback."""
