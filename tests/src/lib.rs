//! Helpers for the integration suite.
