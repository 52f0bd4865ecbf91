//! vmm: see README.md.
