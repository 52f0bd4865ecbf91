//! imagebuilder: see README.md.
