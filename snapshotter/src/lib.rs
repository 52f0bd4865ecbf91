//! snapshotter: see README.md.
