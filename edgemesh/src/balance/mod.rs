//! Endpoint choice.
