//! E2B REST API (control plane).
