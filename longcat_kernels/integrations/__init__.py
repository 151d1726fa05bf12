"""Adapters that put longcat-kernels into other DiT codebases (imported on demand, never at package import)."""
