"""Tests of manifests, Dockerfiles, compose files, packaging and generated code."""
