//! Shared helpers for kiln benchmarks.
