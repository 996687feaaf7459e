//! The shared store for a cluster: PostgreSQL. (Being written.)
