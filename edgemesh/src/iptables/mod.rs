//! nat rules.
