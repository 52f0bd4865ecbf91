//! S3 tier (being written).
